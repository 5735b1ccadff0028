//! Real models' chat templates (gpt-oss's harmony format, DeepSeek-V3.1, Kimi K2, Qwen3,
//! Llama 3.3) render as Hugging Face `transformers` renders them: the expected texts are
//! Jinja2's, set up as `transformers` sets it up (`scripts/chat_template_reference.py`,
//! `fixtures/chat_templates/renders.json`).

use hearth_models::chat_template::{ChatMessage, ChatTemplate};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_templates");

/// Today's date, which some templates write (`strftime_now`), as a placeholder: the
/// reference was rendered on another day.
fn undated(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let date = bytes.len() >= i + 10
            && bytes[i..i + 10].iter().enumerate().all(|(k, b)| if k == 4 || k == 7 { *b == b'-' } else { b.is_ascii_digit() });
        if date {
            out.push_str("YYYY-MM-DD");
            i += 10;
        } else {
            let c = text[i..].chars().next().expect("a character");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

#[test]
fn real_chat_templates_render_as_transformers_does() {
    let renders: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/renders.json")).expect("renders.json"))
            .expect("json");
    let cases = renders["cases"].as_array().expect("cases");
    assert!(cases.len() >= 15);
    for case in cases {
        let name = case["template"].as_str().expect("name");
        let source = std::fs::read_to_string(format!("{FIXTURES}/{name}")).expect("template");
        let template = ChatTemplate::new(&source, case["bos_token"].as_str(), case["eos_token"].as_str())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).expect("messages");
        let add_generation_prompt = case["add_generation_prompt"].as_bool().expect("flag");
        let rendered = template.render(&messages, add_generation_prompt).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = case["rendered"].as_str().expect("text");
        assert_eq!(undated(&rendered), undated(expected), "{name}, {} messages", messages.len());
    }
}
