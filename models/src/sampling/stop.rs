//! Stop strings in streamed text.

/// Finds stop strings in text that arrives piece by piece, typically one decoded token
/// at a time.
///
/// Text that could be the start of a stop string is held back until it is known not to
/// be one, so a client never sees part of a stop string. Generation stops at the first
/// stop string to be *completed*; of several completed at the same point, the one that
/// starts earliest is cut. That is what a token-by-token generation would do, so the
/// output does not depend on how the text is split into pieces.
///
/// Matching is on exact bytes, so a stop string may span any number of pieces; text is
/// only ever cut at a `char` boundary.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not emitted. Between pushes it is a proper prefix of some stop
    /// string, so it stays shorter than the longest one.
    held: String,
    stopped: bool,
}

/// What [`StopMatcher::push`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStatus {
    /// Text that is safe to show the client now (possibly empty).
    pub emit: String,
    /// A stop string was completed: `emit` ends right before it, the rest of the text is
    /// dropped, and generation should end. Every later push returns nothing.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored: they would match before any text.
    pub fn new(mut stops: Vec<String>) -> Self {
        stops.retain(|stop| !stop.is_empty());
        Self { stops, held: String::new(), stopped: false }
    }

    /// Feeds newly decoded text; returns the text safe to emit now and whether a stop
    /// string was hit.
    pub fn push(&mut self, text: &str) -> StopStatus {
        if self.stopped {
            return StopStatus { emit: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StopStatus { emit: text.to_owned(), stopped: false };
        }
        self.held.push_str(text);

        if let Some(start) = self.first_stop() {
            self.held.truncate(start);
            self.stopped = true;
            return StopStatus { emit: std::mem::take(&mut self.held), stopped: true };
        }

        // Everything before the longest suffix that could still grow into a stop string
        // is safe. No stop string can start earlier: it would have to be a longer such
        // suffix.
        let safe = self.held.len() - self.partial_stop_len();
        let rest = self.held.split_off(safe);
        StopStatus { emit: std::mem::replace(&mut self.held, rest), stopped: false }
    }

    /// Ends the stream (EOS or length limit): returns the text held back, which turned
    /// out not to be a stop string. Returns nothing after a stop.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The start of the stop string in `held` that ends first (then starts first).
    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|stop| {
                // A stop's first occurrence is also the one that ends first.
                let start = self.held.find(stop.as_str())?;
                Some((start + stop.len(), start))
            })
            .min()
            .map(|(_, start)| start)
    }

    /// The length of the longest suffix of `held` that is a proper prefix of a stop.
    fn partial_stop_len(&self) -> usize {
        let held = self.held.as_bytes();
        self.stops
            .iter()
            .filter_map(|stop| {
                let longest = (stop.len() - 1).min(held.len());
                (1..=longest).rev().find(|&len| {
                    // A stop starts at a char boundary, so bytes equal to its prefix start
                    // at one in `held` too; checking anyway keeps `push` panic-free.
                    self.held.is_char_boundary(held.len() - len) && held.ends_with(&stop.as_bytes()[..len])
                })
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// Feeds `pieces` and returns everything a client would see, and whether it stopped.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = matcher(stops);
        let mut out = String::new();
        for piece in pieces {
            let status = m.push(piece);
            out.push_str(&status.emit);
            if status.stopped {
                assert_eq!(m.flush(), "");
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    /// What generating `text` token by token would show: the text up to the first stop
    /// string to be completed.
    fn reference(stops: &[&str], text: &str) -> (String, bool) {
        let first = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s).map(|start| (start + s.len(), start)))
            .min();
        match first {
            Some((_, start)) => (text[..start].to_owned(), true),
            None => (text.to_owned(), false),
        }
    }

    #[test]
    fn no_stops_pass_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("hello"), StopStatus { emit: "hello".into(), stopped: false });
        assert_eq!(m.push(""), StopStatus::default());
        assert_eq!(m.flush(), "");
        let mut only_empty = matcher(&[""]);
        assert_eq!(only_empty.push("abc").emit, "abc");
    }

    #[test]
    fn stop_in_one_piece() {
        let mut m = matcher(&["STOP"]);
        assert_eq!(m.push("hello STOP world"), StopStatus { emit: "hello ".into(), stopped: true });
        assert_eq!(m.push("more"), StopStatus { emit: String::new(), stopped: true });
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_split_across_pieces() {
        let mut m = matcher(&["</end>"]);
        assert_eq!(m.push("answer<").emit, "answer");
        assert_eq!(m.push("/e").emit, "");
        assert_eq!(m.push("n").emit, "");
        assert_eq!(m.push("d>tail"), StopStatus { emit: String::new(), stopped: true });
    }

    #[test]
    fn held_text_is_released_when_it_is_not_a_stop() {
        let mut m = matcher(&["</end>"]);
        assert_eq!(m.push("a</e").emit, "a");
        assert_eq!(m.push("x").emit, "</ex");
        assert_eq!(m.push("</").emit, "");
        assert_eq!(m.flush(), "</");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn overlapping_prefixes() {
        let mut m = matcher(&["abc"]);
        assert_eq!(m.push("aab").emit, "a");
        assert_eq!(m.push("c"), StopStatus { emit: String::new(), stopped: true });

        assert_eq!(run(&["aab"], &["a", "a", "a", "b", "x"]), ("a".into(), true));
        assert_eq!(run(&["abab"], &["ab", "a", "bab"]), (String::new(), true));
        assert_eq!(run(&["abab"], &["aba", "c"]), ("abac".into(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["world", "lo"], &["hello world"]), ("hel".into(), true));
        assert_eq!(run(&["lo", "world"], &["hel", "lo world"]), ("hel".into(), true));
        // "bc" is complete before "abcd" could be, whatever the pieces.
        assert_eq!(run(&["abcd", "bc"], &["xabcd"]), ("xa".into(), true));
        assert_eq!(run(&["abcd", "bc"], &["x", "a", "b", "c", "d"]), ("xa".into(), true));
        // Completed together: the one starting first is cut.
        assert_eq!(run(&["c", "abc"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn multibyte_text_is_never_split() {
        // "é" and "🙂" are multi-byte; the stop shares a first byte with other chars.
        let stops = ["🙂終"];
        let (out, stopped) = run(&stops, &["caf", "é 🙂", "🙃", "終わ"]);
        assert_eq!((out.as_str(), stopped), ("café 🙂🙃終わ", false));
        let mut m = matcher(&stops);
        assert_eq!(m.push("é🙂").emit, "é");
        assert_eq!(m.push("終").emit, "");
        assert!(m.stopped);
        assert_eq!(run(&["わり"], &["終", "わ", "り"]), ("終".into(), true));
    }

    #[test]
    fn any_split_gives_the_same_output() {
        let cases: &[(&[&str], &str)] = &[
            (&["abc"], "xxaabababcabc"),
            (&["abcd", "bc"], "zabxabcd"),
            (&["ab", "bab", "abba"], "bbabba"),
            (&["<|im_end|>", "\n\nUser:"], "Sure.\n\nUse <|im_en <|im_end|> trailing"),
            (&["🙂終", "é"], "cafe 🙂🙃終わ 🙂終"),
            (&["never"], "nevenevnenev"),
        ];
        for &(stops, text) in cases {
            let expected = reference(stops, text);
            let chars: Vec<&str> = text.char_indices().map(|(i, c)| &text[i..i + c.len_utf8()]).collect();
            assert_eq!(run(stops, &chars), expected, "char by char: {stops:?} {text:?}");
            for (i, _) in text.char_indices() {
                for (j, _) in text[i..].char_indices() {
                    let pieces = [&text[..i], &text[i..i + j], &text[i + j..]];
                    assert_eq!(run(stops, &pieces), expected, "{stops:?} {pieces:?}");
                }
            }
        }
    }

    #[test]
    fn held_text_stays_short() {
        let mut m = matcher(&["abcdef"]);
        for _ in 0..1000 {
            m.push("xabcde");
            assert!(m.held.len() < "abcdef".len());
        }
        assert_eq!(m.flush(), "abcde");
    }
}
