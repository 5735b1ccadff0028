//! Synthetic GGUF models load and run in Hearth, and are reproducible from their seed.

use std::path::{Path, PathBuf};

use candle_core::Device;
use hearth_models::chat_template::ChatMessage;
use hearth_models::synthetic::{write_synthetic_gguf, Quantization, Shape};
use hearth_models::{ModelSource, StageInput, StageOutput};

fn write_tiny(dir: &Path, quantization: Quantization, seed: u64) -> PathBuf {
    let path = dir.join(format!("tiny-{quantization}-{seed}.gguf"));
    write_synthetic_gguf(Shape::Tiny, quantization, seed, &path).expect("the synthetic model is written");
    path
}

/// Encodes a prompt with the file's own tokenizer and returns the logits of its last token.
fn prompt_logits(path: &Path) -> Vec<f32> {
    let source = ModelSource::open(path).expect("the synthetic model opens");
    let tokens = source.tokenizer().expect("its tokenizer loads").encode("The history of astronomy").expect("encodes");
    assert!(tokens.len() > 2, "the prompt encodes to several tokens: {tokens:?}");
    let stage = source.load_stage(0..source.config().num_layers, &Device::Cpu).expect("the whole model loads");
    let mut cache = stage.new_cache();
    match stage.forward(StageInput::Tokens(&tokens), &mut cache).expect("forward pass") {
        StageOutput::Logits(logits) => logits.to_vec1::<f32>().expect("logits"),
        StageOutput::Hidden(_) => panic!("the whole model returned hidden states, not logits"),
    }
}

#[test]
fn every_quantization_loads_and_gives_finite_logits() {
    let dir = tempfile::tempdir().expect("temp dir");
    for quantization in Quantization::ALL {
        let path = write_tiny(dir.path(), quantization, 1);
        let source = ModelSource::open(&path).expect("opens");
        let config = source.config();
        assert_eq!((config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads), (2, 256, 4, 2));
        assert!(config.tied_embeddings, "Llama 3.2's layout ties the head to the embedding");

        let logits = prompt_logits(&path);
        assert_eq!(logits.len(), config.vocab_size);
        assert!(logits.iter().all(|l| l.is_finite()), "{quantization}: logits are finite");
        assert!(logits.iter().any(|&l| l != logits[0]), "{quantization}: logits are not constant");
    }
}

#[test]
fn the_seed_alone_decides_the_bytes() {
    let (dir, other_dir) = (tempfile::tempdir().expect("temp dir"), tempfile::tempdir().expect("temp dir"));
    let first = std::fs::read(write_tiny(dir.path(), Quantization::Q4KM, 7)).expect("read");
    let again = std::fs::read(write_tiny(other_dir.path(), Quantization::Q4KM, 7)).expect("read");
    let other = std::fs::read(write_tiny(dir.path(), Quantization::Q4KM, 8)).expect("read");
    assert!(first == again, "the same seed writes a byte-identical file");
    assert_eq!(first.len(), other.len(), "a different seed keeps the layout");
    assert!(first != other, "a different seed writes different weights");
}

#[test]
fn the_chat_template_renders_llama_3_turns() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = ModelSource::open(&write_tiny(dir.path(), Quantization::Q4_0, 1)).expect("opens");
    let tokenizer = source.tokenizer().expect("tokenizer");
    let template = source.chat_template(&tokenizer).expect("template parses").expect("the file ships a template");
    let messages = [ChatMessage { role: "user".into(), content: " Hi ".into() }];
    let rendered = template.render(&messages, true).expect("renders");
    assert_eq!(
        rendered,
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}
