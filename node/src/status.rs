//! `hearth status`: the cluster as a running node sees it.

use anyhow::Context as _;
use hearth_mesh::format_bytes;
use serde_json::Value;

/// Fetches `GET /v1/cluster` from the node at `api` and prints it.
pub fn print(api: &str, raw_json: bool) -> anyhow::Result<()> {
    let url = format!("{}/v1/cluster", api.trim_end_matches('/'));
    let body: Value = ureq::get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .call()
        .with_context(|| format!("asking {url} (is `hearth serve` running there?)"))?
        .into_json()
        .context("reading the cluster view")?;
    if raw_json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let me = text(&body["node"]);
    println!(
        "epoch {}  coordinator {}  {}",
        body["epoch"],
        short(&text(&body["coordinator"])),
        if body["ready"].as_bool() == Some(true) { "ready" } else { "not ready" }
    );
    if let Some(problem) = body["problem"].as_str() {
        println!("problem: {problem}");
    }
    println!("{:<14} {:<22} {:<22} {:>10}  {:<7} layers", "node", "data plane", "api", "memory", "backend");
    for node in body["nodes"].as_array().into_iter().flatten() {
        let id = text(&node["id"]);
        let layers = match node["layers"].as_array() {
            Some(range) if range.len() == 2 => {
                let state = if node["ready"].as_bool() == Some(true) { "" } else { " (loading)" };
                format!("{}..{}{state}", range[0], range[1])
            }
            _ => "none".into(),
        };
        println!(
            "{:<14} {:<22} {:<22} {:>10}  {:<7} {layers}{}",
            short(&id),
            text(&node["addr"]),
            text(&node["api_addr"]),
            format_bytes(node["usable_memory_bytes"].as_u64().unwrap_or(0)),
            text(&node["backend"]),
            if id == me { "  ← this node" } else { "" }
        );
    }
    Ok(())
}

/// Node ids are long; their last characters tell them apart.
fn short(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 12 {
        id.to_string()
    } else {
        format!("…{}", chars[chars.len() - 11..].iter().collect::<String>())
    }
}
