//! What Hearth does not run is refused at `ModelSource::open`, in one line that names it
//! and says what is supported.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use hearth_models::synthetic::header_only_gguf;
use hearth_models::{Error, ModelSource};

fn gguf(architecture: &str, dtype: GgmlDType) -> Vec<u8> {
    header_only_gguf(architecture, dtype).expect("writes")
}

/// Rewrites the GGML type of the file's one tensor to `type_number` in its header: how a
/// file of a type candle cannot write (IQ4_NL and the like) is made.
fn with_tensor_type(mut file: Vec<u8>, type_number: u32) -> Vec<u8> {
    let name = b"token_embd.weight";
    let at = file.windows(name.len()).position(|w| w == name).expect("the tensor's name is in the header");
    // After the name: its dimension count (u32), two dimensions (u64 each), then the type.
    let type_at = at + name.len() + 4 + 2 * 8;
    file[type_at..type_at + 4].copy_from_slice(&type_number.to_le_bytes());
    file
}

fn open_bytes(bytes: &[u8], dir: &Path) -> Result<ModelSource, Error> {
    let path = dir.join("model.gguf");
    std::fs::write(&path, bytes).expect("writes the file");
    ModelSource::open(&path)
}

#[test]
fn an_architecture_hearth_lacks_is_named_with_what_is_supported() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The file is otherwise readable: a supported name opens it.
    assert!(open_bytes(&gguf("llama", GgmlDType::Q8_0), dir.path()).is_ok(), "the same file as `llama` opens");
    for architecture in ["phi3", "falcon"] {
        let Err(error) = open_bytes(&gguf(architecture, GgmlDType::Q8_0), dir.path()) else {
            panic!("{architecture}: opened");
        };
        assert!(matches!(error, Error::Unsupported(_)), "{architecture}: {error:?}");
        let message = error.to_string();
        assert!(message.contains(&format!("architecture `{architecture}`")), "{message}");
        for supported in ["llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma3", "deepseek2", "gpt-oss"] {
            assert!(message.contains(supported), "{architecture}: the message lists {supported}: {message}");
        }
        assert_eq!(message.lines().count(), 1, "one line: {message}");
    }
}

#[test]
fn a_tensor_type_hearth_cannot_read_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = gguf("llama", GgmlDType::Q4_0);
    // The type number written where the patch goes is Q4_0's (2): the patch hits the type.
    assert!(open_bytes(&with_tensor_type(file.clone(), 2), dir.path()).is_ok(), "Q4_0 written back opens");
    let Err(error) = open_bytes(&with_tensor_type(file, 20), dir.path()) else { panic!("IQ4_NL opened") };
    assert!(matches!(error, Error::Unsupported(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("GGML type 20 (IQ4_NL)") && message.contains("Q4_K_M"), "{message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");
}
