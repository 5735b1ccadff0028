#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hearth_mesh::fuzzing::gossip(data));
