mod common;
use common::{load_split, open_default_model, run_pipeline, argmax};
use hearth_models::StageCache;

fn read(path: &str) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn dev_logits_bit_exact() {
    let source = open_default_model();
    for cuts in [vec![], vec![7, 19]] {
        let stages = load_split(&source, &cuts);
        for (dump, prompt, steps) in [
            ("france", vec![504u32, 3575, 282, 4649, 314], 3),
            ("mid", (0..40u32).map(|i| 200 + (i * 4099) % 30000).collect(), 3),
            ("long", (0..70u32).map(|i| 100 + (i * 7919) % 40000).collect(), 30),
        ] {
            let mut caches: Vec<StageCache> = stages.iter().map(|s| s.new_cache()).collect();
            let mut logits = run_pipeline(&stages, &mut caches, &prompt);
            for s in 0..=steps {
                let theirs = read(&format!("/tmp/lref2/{dump}/{s}/result_output.bin"));
                let diff = logits.iter().zip(&theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                let maxd = logits.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                println!("{dump} {cuts:?} step {s}: {diff} of {} logits differ, max {maxd}", theirs.len());
                assert_eq!(diff, 0);
                let next = argmax(&logits);
                logits = run_pipeline(&stages, &mut caches, &[next]);
            }
        }
    }
}
