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
    let hops = body["hops"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !hops.is_empty() {
        println!();
        println!("{:<14} {:<14} {:<22} {:<10} {:>9} {:>12}", "hop from", "to", "path", "interface", "rtt", "throughput");
        for hop in hops {
            let path = &hop["path"];
            let (addr, interface, rtt, rate) = if path.is_null() {
                ("(measuring)".to_string(), "-".to_string(), "-".to_string(), "-".to_string())
            } else {
                (text(&path["addr"]), text(&path["interface"]), micros(&path["rtt_us"]), rate(&path["bytes_per_second"]))
            };
            println!(
                "{:<14} {:<14} {addr:<22} {interface:<10} {rtt:>9} {rate:>12}",
                short(&text(&hop["from"])),
                short(&text(&hop["to"])),
            );
        }
    }
    // Addresses listed for a peer where someone else answers: never used, but worth knowing.
    let paths = body["paths"].as_array().map(Vec::as_slice).unwrap_or_default();
    let refused: Vec<&Value> = paths.iter().filter(|path| path["not_the_peer"].is_string()).collect();
    if !refused.is_empty() {
        println!();
        for path in refused {
            let (addr, to, why) = (text(&path["addr"]), short(&text(&path["to"])), text(&path["not_the_peer"]));
            println!("not a path: {addr} does not reach {to}: {why}");
        }
    }
    Ok(())
}

/// A round trip in microseconds, as `hearth status` shows it.
fn micros(value: &Value) -> String {
    match value.as_u64() {
        Some(0) | None => "-".into(),
        Some(us) if us < 10_000 => format!("{us} µs"),
        Some(us) => format!("{:.1} ms", us as f64 / 1000.0),
    }
}

/// A throughput in bytes per second, in bits per second as links are rated.
fn rate(value: &Value) -> String {
    match value.as_u64() {
        Some(0) | None => "-".into(),
        Some(bytes) => {
            let bits = bytes as f64 * 8.0;
            if bits >= 1e9 {
                format!("{:.1} Gbit/s", bits / 1e9)
            } else {
                format!("{:.1} Mbit/s", bits / 1e6)
            }
        }
    }
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
