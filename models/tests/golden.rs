//! Greedy decoding of the default model against llama.cpp's reference outputs.

mod common;

use common::{greedy, ids, load_split, open_default_model, reference};

#[test]
fn greedy_continuations_match_llama_cpp() {
    let source = open_default_model();
    let stages = load_split(&source, &[]);
    let reference = reference();
    let completions = reference["completions"].as_array().expect("completions");
    assert_eq!(completions.len(), 6, "the fixture holds six prompts");

    let mut fully_matching = 0;
    for completion in completions {
        let prompt = completion["prompt"].as_str().expect("prompt");
        let prompt_ids = ids(&completion["prompt_ids"]);
        let expected = ids(&completion["generated_ids"]);
        let (generated, logits) = greedy(&stages, &prompt_ids, expected.len());
        let agreeing = generated.iter().zip(&expected).take_while(|(a, b)| a == b).count();
        eprintln!("{prompt:?}: {agreeing}/{} tokens agree with llama.cpp", expected.len());
        if agreeing < expected.len() {
            // A near-tie in llama.cpp's own logits explains a divergence; a wide gap would not.
            let theirs = &completion["top5_logits_per_step"][agreeing];
            let ours = top(&logits[agreeing], 3);
            eprintln!("  step {agreeing}: ours {ours:?}, llama.cpp {theirs}");
        }
        assert!(
            agreeing >= 8.min(expected.len()),
            "{prompt:?}: only the first {agreeing} tokens agree with llama.cpp\n ours: {generated:?}\n llama.cpp: {expected:?}"
        );
        if agreeing == expected.len() {
            fully_matching += 1;
        }
    }
    assert!(fully_matching >= 5, "only {fully_matching} of 6 continuations match llama.cpp in full");
}

fn top(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut indexed: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1));
    indexed.truncate(k);
    indexed
}
