#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_mesh::fuzzing::txt_record(data));
