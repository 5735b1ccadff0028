//! The operations of `ops.rs` and `attention.rs` against llama.cpp's own intermediate
//! tensors (`llama_cpp_ops.json`, see its `about`), bit for bit, on every instruction set;
//! and the vector code against the portable code on inputs that reach its special cases.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use super::attention::{self, Heads, KvCache, Scratch, Sum};
use super::ops::{self, Rope, RopePairs};
use super::Isa;

fn fixture() -> Value {
    // A larger fixture of the same shape can be named for a wider check.
    match std::env::var_os("HEARTH_OPS_FIXTURE") {
        Some(path) => serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap(),
        None => serde_json::from_str(include_str!("llama_cpp_ops.json")).unwrap(),
    }
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn f16s(value: &Value) -> Vec<f32> {
    let hex = value.as_str().unwrap().as_bytes();
    hex.chunks_exact(4)
        .map(|h| {
            let byte = |i: usize| u8::from_str_radix(std::str::from_utf8(&h[i..i + 2]).unwrap(), 16).unwrap();
            f16::from_bits(u16::from_le_bytes([byte(0), byte(2)])).to_f32()
        })
        .collect()
}

/// How many values differ in their bits, and the first that does.
fn differences(got: &[f32], expected: &[f32]) -> (usize, Option<(usize, f32, f32)>) {
    assert_eq!(got.len(), expected.len());
    let differing: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != expected[i].to_bits()).collect();
    (differing.len(), differing.first().map(|&i| (i, got[i], expected[i])))
}

fn assert_same(got: &[f32], expected: &[f32], what: impl std::fmt::Display) {
    let (count, first) = differences(got, expected);
    let n = got.len();
    assert_eq!(count, 0, "{what}: {count} of {n} values differ from llama.cpp's, first (at, ours, theirs) {first:?}");
}

#[test]
fn rms_norm_matches_llama_cpp() {
    let fixture = fixture();
    let eps = fixture["eps"].as_f64().unwrap() as f32;
    for (i, case) in fixture["norms"].as_array().unwrap().iter().enumerate() {
        let x = floats(&case["input"]);
        let ones = vec![1.0f32; x.len()];
        let mut out = vec![0.0; x.len()];
        ops::rms_norm(&x, &ones, eps, &mut out);
        assert_same(&out, &floats(&case["output"]), format!("norm {i}"));
        ops::rms_norm_in_place(&mut out, &ones, 0.0);
        let mut again = x.clone();
        ops::rms_norm_in_place(&mut again, &ones, eps);
        assert_same(&again, &floats(&case["output"]), format!("norm {i} in place"));
    }
}

#[test]
fn rope_matches_llama_cpp() {
    let fixture = fixture();
    let d = fixture["head_dim"].as_u64().unwrap() as usize;
    let rope = Rope::new(d, fixture["rope_base"].as_f64().unwrap() as f32, RopePairs::Adjacent, 1.0, None);
    let mut angles = vec![0.0; rope.angles_len()];
    for (i, case) in fixture["ropes"].as_array().unwrap().iter().enumerate() {
        let position = case["position"].as_u64().unwrap() as usize;
        rope.angles(position, &mut angles);
        let expected = floats(&case["output"]);
        let mut x = floats(&case["input"]);
        rope.rotate(&mut x, &angles);
        assert_same(&x, &expected, format!("rope {i}, position {position}"));
        let mut x = floats(&case["input"]);
        rope.rotate_portable(&mut x, &angles);
        assert_same(&x, &expected, format!("portable rope {i}, position {position}"));
    }
}

#[test]
fn silu_gate_matches_llama_cpp() {
    let fixture = fixture();
    for (i, case) in fixture["silus"].as_array().unwrap().iter().enumerate() {
        let gate = floats(&case["gate"]);
        let up = floats(&case["up"]);
        let silu: Vec<f32> = gate.iter().map(|&g| ops::silu(g)).collect();
        assert_same(&silu, &floats(&case["silu"]), format!("silu {i}"));
        let expected = floats(&case["product"]);
        let mut got = gate.clone();
        ops::silu_mul(&mut got, &up, gate.len());
        assert_same(&got, &expected, format!("silu gate {i}"));
        let mut got = gate.clone();
        ops::silu_mul_portable(&mut got, &up, gate.len());
        assert_same(&got, &expected, format!("portable silu gate {i}"));
    }
}

/// RoPE's other pairing and its frequency scalings, SiLU with a tail, and RMS norm over
/// heads, from single ggml ops.
#[test]
fn other_variants_match_ggml() {
    let fixture = fixture();
    let ggml = &fixture["ggml_ops"];
    for (i, case) in ggml["ropes"].as_array().unwrap().iter().enumerate() {
        let d = case["head_dim"].as_u64().unwrap() as usize;
        let pairs = match case["pairs"].as_str().unwrap() {
            "halves" => RopePairs::Halves,
            _ => RopePairs::Adjacent,
        };
        let base = case["base"].as_f64().unwrap() as f32;
        let freq_scale = case["freq_scale"].as_f64().unwrap() as f32;
        let factors = case.get("factors").map(floats);
        let rope = Rope::new(d, base, pairs, freq_scale, factors);
        let positions = case["positions"].as_array().unwrap();
        let (input, expected) = (floats(&case["input"]), floats(&case["output"]));
        let per_position = input.len() / positions.len();
        let mut angles = vec![0.0; rope.angles_len()];
        for (k, position) in positions.iter().enumerate() {
            let position = position.as_u64().unwrap() as usize;
            rope.angles(position, &mut angles);
            let range = k * per_position..(k + 1) * per_position;
            let mut x = input[range.clone()].to_vec();
            rope.rotate(&mut x, &angles);
            assert_same(&x, &expected[range.clone()], format!("rope case {i} ({pairs:?}), position {position}"));
            let mut x = input[range.clone()].to_vec();
            rope.rotate_portable(&mut x, &angles);
            assert_same(&x, &expected[range], format!("portable rope case {i}, position {position}"));
        }
    }
    let silu = &ggml["silu_rows"];
    let row = silu["row"].as_u64().unwrap() as usize;
    let (gate, up, expected) = (floats(&silu["gate"]), floats(&silu["up"]), floats(&silu["product"]));
    let mut got = gate.clone();
    ops::silu_mul(&mut got, &up, row);
    assert_same(&got, &expected, format!("silu gate on rows of {row}"));
    let mut got = gate.clone();
    ops::silu_mul_portable(&mut got, &up, row);
    assert_same(&got, &expected, format!("portable silu gate on rows of {row}"));
    let norm = &ggml["rms_norm_rows"];
    let (x, weight, expected) = (floats(&norm["input"]), floats(&norm["weight"]), floats(&norm["output"]));
    let eps = norm["eps"].as_f64().unwrap() as f32;
    let mut got = x.clone();
    ops::rms_norm_in_place(&mut got, &weight, eps);
    assert_same(&got, &expected, "rms norm over heads");
}

#[test]
fn attention_matches_llama_cpp() {
    let fixture = fixture();
    let d = fixture["head_dim"].as_u64().unwrap() as usize;
    let group = fixture["query_heads_per_kv_head"].as_u64().unwrap() as usize;
    let scale = fixture["scale"].as_f64().unwrap() as f32;
    let heads = Heads::new(group, 1, d);
    let mut scratch = Scratch::default();
    for case in fixture["attentions"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (keys, values) = (f16s(&case["keys"]), f16s(&case["values"]));
        for step in case["steps"].as_array().unwrap() {
            let batch = step["batch"].as_u64().unwrap() as usize;
            let context = step["context"].as_u64().unwrap() as usize;
            let mut cache = KvCache::new(d, 7);
            cache.append(&keys[..context * d], &values[..context * d]);
            for row in step["rows"].as_array().unwrap() {
                let t = row["row"].as_u64().unwrap() as usize;
                let what = format!("{name}, {batch} positions after {}, row {t}", context - batch);
                check_attention_row(&heads, &cache, batch, t, row, scale, &what, &mut scratch);
            }
        }
    }
}

/// One query row of an attention case: its scores, probabilities and outputs.
#[allow(clippy::too_many_arguments)]
fn check_attention_row(
    heads: &Heads,
    cache: &KvCache,
    batch: usize,
    t: usize,
    row: &Value,
    scale: f32,
    what: &str,
    scratch: &mut Scratch,
) {
    let d = heads.head_dim;
    let seen = cache.len() - batch + t + 1;
    let q = floats(&row["queries"]);
    let expected_scores = floats(&row["scores"]);
    let expected_probs = floats(&row["probs"]);
    for h in 0..heads.heads {
        let query: Vec<f32> = q[h * d..(h + 1) * d].iter().map(|&v| ops::round_f16(v)).collect();
        let sum = Sum::scores(heads, batch);
        let mut scores = vec![0.0; seen];
        attention::scores_portable(sum, &query, cache.keys(), d, &mut scores);
        let range = h * seen..(h + 1) * seen;
        assert_same(&scores, &expected_scores[range.clone()], format!("scores of {what}, head {h}"));
        #[cfg(target_arch = "x86_64")]
        if let Isa::Avx2(avx2) = Isa::detect() {
            let mut fast = vec![0.0; seen];
            super::ops_x86::scores(avx2, sum, &query, cache.keys(), d, &mut fast);
            assert_same(&fast, &scores, format!("AVX2 scores of {what}, head {h}"));
        }
        let mut probs = scores.clone();
        ops::softmax_portable(&mut probs, scale, None, false);
        assert_same(&probs, &expected_probs[range.clone()], format!("probabilities of {what}, head {h}"));
        let mut probs = scores.clone();
        ops::softmax(&mut probs, scale, None, false);
        assert_same(&probs, &expected_probs[range], format!("probabilities of {what}, head {h}"));
    }
    for isa in Isa::all() {
        let mut out = vec![0.0; q.len()];
        attention::attend_with(isa, heads, &q, cache, batch, t..t + 1, plain(scale), &mut out, scratch);
        assert_same(&out, &floats(&row["outputs"]), format!("{isa:?} attention of {what}"));
    }
}

/// Inputs around the edges of the exponential's range, and random ones.
fn exp_inputs(rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut x = vec![
        0.0, -0.0, 1.0, -1.0, 88.0, 88.5, 88.7, 88.72, 88.8, 89.0, 100.0, 133.0, 134.0, -87.0, -87.5, -88.0, -100.0,
        -103.0, -103.9, -104.0, -110.0, -132.0, -133.0, -134.0, -140.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30,
        -1e-30, 0.5, -0.5, 20.0, -20.0,
    ];
    x.extend((0..4000).map(|_| rng.random_range(-120.0f32..100.0)));
    x.extend((0..4000).map(|_| rng.random_range(-8.0f32..8.0)));
    x.resize(x.len().next_multiple_of(8), 0.25);
    x
}

#[test]
fn exponential_behaves_at_the_edges() {
    assert_eq!(ops::expf(0.0), 1.0);
    assert_eq!(ops::expf(f32::NEG_INFINITY), 0.0);
    assert_eq!(ops::expf(f32::INFINITY), f32::INFINITY);
    assert!(ops::expf(f32::NAN).is_nan());
    // Within ggml's stated error of the true value, subnormal results included.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for x in exp_inputs(&mut rng) {
        let (ours, exact) = (ops::expf(x) as f64, (x as f64).exp());
        if exact < f32::MAX as f64 && exact > 1e-37 {
            assert!((ours - exact).abs() <= 2.5e-7 * exact, "e^{x}: {ours} vs {exact}");
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exponential_equals_the_scalar_one() {
    let Isa::Avx2(avx2) = Isa::detect() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = exp_inputs(&mut rng);
    for chunk in x.chunks_exact(8) {
        let lanes: [f32; 8] = chunk.try_into().unwrap();
        let got = super::ops_x86::exp_lanes(avx2, lanes);
        for (i, (&g, &x)) in got.iter().zip(chunk).enumerate() {
            let want = ops::expf(x);
            assert!(g.to_bits() == want.to_bits(), "lane {i}: e^{x} = {g} vs {want}");
        }
    }
    // Rows whose length is not a multiple of 16 leave a tail to the C library.
    let up: Vec<f32> = (0..x.len()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    for row in [8, 24, 40, x.len()] {
        let n = x.len() / row * row;
        let (mut fast, mut portable) = (x[..n].to_vec(), x[..n].to_vec());
        super::ops_x86::silu_mul(avx2, &mut fast, &up[..n], row);
        ops::silu_mul_portable(&mut portable, &up[..n], row);
        let (count, first) = differences(&fast, &portable);
        assert_eq!(count, 0, "rows of {row}: first difference {first:?}");
    }
}

/// Random heads, caches and batches: every instruction set attends exactly as the
/// portable code, over every summation order.
#[test]
fn every_isa_attends_like_the_portable_code() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for (heads, kv_heads, d) in [(9, 3, 64), (4, 2, 8), (2, 1, 128), (4, 4, 24), (2, 2, 80), (2, 1, 6)] {
        let shape = Heads::new(heads, kv_heads, d);
        // Decoding on each side of the f64 part's boundaries (n_kv 32, 64, 96, 128), and batches.
        let decoding = [(3, 1), (31, 1), (32, 1), (40, 1), (63, 1), (64, 1), (80, 1), (127, 1)];
        let batches = decoding.into_iter().chain([(0, 1), (0, 5), (0, 70), (20, 30)]);
        for (start, batch) in batches {
            let context = start + batch;
            let mut cache = KvCache::new(shape.kv_width(), 16);
            let kv: Vec<f32> = (0..2 * context * shape.kv_width()).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let (k, v) = kv.split_at(context * shape.kv_width());
            cache.append(k, v);
            let q: Vec<f32> = (0..batch * shape.q_width()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            // Every other case with a sink per head (gpt-oss).
            let scores = if (start + batch) % 2 == 0 { with_sinks(&mut rng, 0.3, heads) } else { plain(0.3) };
            let mut expected = vec![0.0; q.len()];
            let mut scratch = Scratch::default();
            let all = 0..batch;
            attention::attend_with(Isa::Portable, &shape, &q, &cache, batch, all, scores.clone(), &mut expected, &mut scratch);
            assert!(expected.iter().all(|v| v.is_finite()));
            for isa in Isa::all() {
                let mut got = vec![0.0; q.len()];
                attention::attend_with(isa, &shape, &q, &cache, batch, 0..batch, scores.clone(), &mut got, &mut scratch);
                let (count, first) = differences(&got, &expected);
                let what = format!("{isa:?}, {heads}/{kv_heads} heads of {d}, {batch} after {start}");
                assert_eq!(count, 0, "{what}: first difference {first:?}");
                // A subset of the rows gives the same rows.
                let rows = batch / 2..batch;
                let width = shape.q_width();
                let mut part = vec![0.0; rows.len() * width];
                attention::attend_with(
                    isa,
                    &shape,
                    &q[rows.start * width..],
                    &cache,
                    batch,
                    rows.clone(),
                    scores.clone(),
                    &mut part,
                    &mut scratch,
                );
                assert_eq!(part, expected[rows.start * width..], "{isa:?}: rows {rows:?} alone");
            }
        }
    }
}

/// Attention spread over threads computes what one thread computes.
#[test]
fn threads_attend_like_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let shape = Heads::new(9, 3, 64);
    for (start, batch, rows) in [(0, 40, 0..40), (10, 30, 29..30), (100, 1, 0..1)] {
        let context = start + batch;
        let mut cache = KvCache::new(shape.kv_width(), 64);
        let kv: Vec<f32> = (0..2 * context * shape.kv_width()).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let (k, v) = kv.split_at(context * shape.kv_width());
        cache.append(k, v);
        let q: Vec<f32> = (0..rows.len() * shape.q_width()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let scores = if batch % 2 == 0 { with_sinks(&mut rng, 0.125, shape.heads) } else { plain(0.125) };
        for isa in Isa::all() {
            let mut expected = vec![0.0; q.len()];
            let mut scratch = Scratch::default();
            attention::attend_with(isa, &shape, &q, &cache, batch, rows.clone(), scores.clone(), &mut expected, &mut scratch);
            for threads in [2, 3, 5] {
                let mut got = vec![0.0; q.len()];
                attention::attend_parallel(isa, &shape, &q, &mut cache, batch, rows.clone(), scores.clone(), &mut got, threads);
                assert_eq!(got, expected, "{isa:?}, {threads} threads, {batch} after {start}");
                assert_eq!(cache.len(), context, "the cache came back");
            }
        }
    }
}

#[test]
fn kv_cache_grows_in_steps_and_appends_in_place() {
    let mut cache = KvCache::new(4, 8);
    cache.append(&[1.0; 8], &[2.0; 8]);
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.allocated_bytes(), 2 * 8 * 4 * 2);
    let keys = cache.keys().as_ptr();
    cache.append(&[1.0; 24], &[2.0; 24]);
    assert_eq!(cache.len(), 8);
    assert_eq!(cache.keys().as_ptr(), keys, "appending within the step moved the cache");
    cache.append(&[0.1; 4], &[0.2; 4]);
    assert_eq!(cache.len(), 9);
    assert_eq!(cache.allocated_bytes(), 2 * 16 * 4 * 2);
    assert_eq!(cache.keys()[35], f16::from_f32(0.1));
    cache.truncate(3);
    assert_eq!(cache.len(), 3);
}

/// A sliding cache that forgets what no query will see again attends as one that keeps
/// everything, step after step, and holds at most `sliding_positions` rows between steps.
#[test]
fn a_sliding_cache_forgets_only_what_no_query_sees() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let shape = Heads::new(4, 2, 64);
    let window = 5;
    let (mut forgetting, mut keeping) =
        (KvCache::sliding(shape.kv_width(), 16, window), KvCache::sliding(shape.kv_width(), 16, window));
    let mut scratch = Scratch::default();
    // A long first step (a prompt), then single positions, then a few more at once.
    for batch in [150, 1, 1, 1, 7, 1, 40, 1, 1, 90, 1] {
        let kv: Vec<f32> = (0..2 * batch * shape.kv_width()).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let (k, v) = kv.split_at(batch * shape.kv_width());
        forgetting.append(k, v);
        keeping.append(k, v);
        let q: Vec<f32> = (0..batch * shape.q_width()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        for isa in Isa::all() {
            let (mut expected, mut got) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            attention::attend_with(isa, &shape, &q, &keeping, batch, 0..batch, plain(0.125), &mut expected, &mut scratch);
            attention::attend_with(isa, &shape, &q, &forgetting, batch, 0..batch, plain(0.125), &mut got, &mut scratch);
            assert_eq!(got, expected, "{isa:?}, {batch} positions after {}", forgetting.len() - batch);
        }
        forgetting.forget_unseen();
        assert_eq!(forgetting.len(), keeping.len(), "positions seen");
        assert!(forgetting.held() <= KvCache::sliding_positions(window), "{} rows held", forgetting.held());
    }
    assert!(forgetting.held() < keeping.held() / 2, "it forgot: {} of {} rows", forgetting.held(), keeping.held());
}

/// Scores scaled by `scale`, without sinks.
fn plain(scale: f32) -> attention::Scores {
    attention::Scores { scale, sinks: None }
}

/// Scores scaled by `scale`, with a random sink logit for each of `heads` heads.
fn with_sinks(rng: &mut ChaCha8Rng, scale: f32, heads: usize) -> attention::Scores {
    let sinks: Vec<f32> = (0..heads).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    attention::Scores { scale, sinks: Some(sinks.into()) }
}

/// A sink takes its share of each softmax as one more score without a value: against f64
/// arithmetic on the same f16 keys and values.
#[test]
fn sinks_take_a_share_of_attention() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let shape = Heads::new(4, 2, 16);
    let context = 37;
    let mut cache = KvCache::new(shape.kv_width(), 16);
    let kv: Vec<f32> = (0..2 * context * shape.kv_width()).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let (k, v) = kv.split_at(context * shape.kv_width());
    cache.append(k, v);
    let q: Vec<f32> = (0..shape.q_width()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let scores = with_sinks(&mut rng, 0.25, shape.heads);
    let sinks = scores.sinks.clone().expect("sinks");
    let mut out = vec![0.0; q.len()];
    attention::attend_with(Isa::Portable, &shape, &q, &cache, 1, 0..1, scores, &mut out, &mut Scratch::default());
    let f16 = |x: f32| half::f16::from_f32(x).to_f32() as f64;
    let (d, width) = (shape.head_dim, shape.kv_width());
    for h in 0..shape.heads {
        let g = h / (shape.heads / shape.kv_heads);
        let logits: Vec<f64> = (0..context)
            .map(|p| (0..d).map(|i| f16(q[h * d + i]) * f16(k[p * width + g * d + i])).sum::<f64>() * 0.25)
            .collect();
        let max = logits.iter().copied().fold(sinks[h] as f64, f64::max);
        let total = logits.iter().map(|l| (l - max).exp()).sum::<f64>() + (sinks[h] as f64 - max).exp();
        for i in 0..d {
            let expected: f64 = (0..context).map(|p| (logits[p] - max).exp() / total * f16(v[p * width + g * d + i])).sum();
            let got = out[h * d + i] as f64;
            assert!((got - expected).abs() < 2e-3, "head {h}, value {i}: {got} vs {expected}");
        }
    }
}
