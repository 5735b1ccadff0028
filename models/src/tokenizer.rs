//! Text to token ids and back, for GGUF files and Hugging Face folders.
//!
//! A Hugging Face folder ships a `tokenizer.json`, which is used as it is. A GGUF file only
//! carries the raw vocabulary under `tokenizer.ggml.*`, so the tokenizer is rebuilt from it
//! here, and rebuilt to split text exactly as llama.cpp does: llama.cpp is the reference
//! the golden tests hold us to. Two kinds of GGUF vocabulary are supported:
//!
//! - `gpt2`: byte-level BPE. Text is first split by the regexes llama.cpp associates with
//!   `tokenizer.ggml.pre`, then each piece is mapped to byte-level characters and merged.
//!   No space is prepended: doing so (as a naive conversion does) turns the first word of
//!   every prompt into its mid-sentence variant, e.g. `ĠThe` instead of `The`.
//! - `llama`: SentencePiece, rebuilt as a byte-fallback BPE whose merges are derived from
//!   the token scores the way Hugging Face's converter derives them.
//!
//! Control tokens (`<|im_start|>`, `<s>`...) are registered as special added tokens, so
//! their text in a rendered chat template encodes to their single id, and decoding skips
//! them.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::{Error, Result};

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";

/// The SentencePiece word-boundary marker, which stands for a space.
const SPM_SPACE: &str = "\u{2581}";

/// Texts of the tokens chat models end a turn with. They stop generation when the
/// vocabulary has them as special (control) tokens; as ordinary tokens they are just text.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
    // gpt-oss's harmony format: the end of the final answer, and of a tool call.
    "<|return|>",
    "<|call|>",
    // Kimi K2's.
    "[EOT]",
];

/// In harmony (gpt-oss), `<|end|>` closes each message, the reasoning included, and only
/// these two end the turn: a vocabulary with both does not stop at `<|end|>`, as in
/// llama.cpp.
const HARMONY_TURN_ENDS: [&str; 2] = ["<|return|>", "<|call|>"];
const HARMONY_MESSAGE_END: &str = "<|end|>";

/// The stream type of the `tokenizers` crate, spelled out once.
type InnerDecodeStream<'a> = tokenizers::DecodeStream<
    'a,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// A model's tokenizer: encodes prompts, decodes generated ids, and knows which ids end
/// generation.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    /// Whether [`Tokenizer::encode`] prepends `bos`. Always `false` when `bos` is `None`.
    add_bos: bool,
    stop_token_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
struct SpecialToken {
    id: u32,
    text: String,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    ///
    /// Fails with [`Error::InvalidModel`] when the metadata is missing, mistyped or
    /// inconsistent, and with [`Error::Unsupported`] for a vocabulary kind or
    /// pre-tokenizer llama.cpp's rules are not implemented for (llama.cpp itself refuses
    /// an unknown pre-tokenizer, and guessing would silently produce wrong ids).
    pub fn from_gguf(metadata: &HashMap<String, Value>) -> Result<Self> {
        let gguf = Gguf(metadata);
        let model = gguf.string(KEY_MODEL)?.ok_or_else(|| {
            invalid(format!("GGUF metadata has no `{KEY_MODEL}`: the file carries no tokenizer"))
        })?;
        let tokens = gguf
            .strings(KEY_TOKENS)?
            .ok_or_else(|| invalid(format!("GGUF metadata has no `{KEY_TOKENS}`")))?;
        if tokens.is_empty() {
            return Err(invalid(format!("GGUF metadata `{KEY_TOKENS}` is empty")));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(invalid(format!("GGUF metadata `{KEY_TOKENS}` has too many tokens")));
        }
        let types = token_types(&gguf, tokens.len())?;

        let vocab = GgufVocab { tokens: &tokens, types: &types };
        let (mut inner, default_ids, default_add_bos) = match model {
            "gpt2" => {
                let pre = PreTokenizerSpec::from_gguf(gguf.string(KEY_PRE)?)?;
                let merges = gguf.strings(KEY_MERGES)?.ok_or_else(|| {
                    invalid(format!("GGUF metadata has no `{KEY_MERGES}`, which a gpt2 vocabulary needs"))
                })?;
                let inner = byte_level_bpe(&vocab, &merges, pre)?;
                (inner, SpecialIds::default(), pre.add_bos)
            }
            "llama" => {
                let scores = gguf.floats(KEY_SCORES)?;
                if let Some(scores) = &scores {
                    check_len(KEY_SCORES, scores.len(), tokens.len())?;
                }
                let unk = gguf.token_id(KEY_UNK, tokens.len())?.or(Some(0));
                let add_space_prefix = gguf.bool(KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);
                let inner = sentencepiece_bpe(&vocab, scores.as_deref(), unk, add_space_prefix)?;
                // llama.cpp's defaults for SentencePiece vocabularies.
                (inner, SpecialIds { bos: Some(1), eos: Some(2) }, true)
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "tokenizer model `{other}` (`{KEY_MODEL}`); supported: gpt2, llama"
                )))
            }
        };
        register_added_tokens(&mut inner, &vocab)?;

        let in_range = |id: u32| (id as usize) < tokens.len();
        let bos = gguf.token_id(KEY_BOS, tokens.len())?.or(default_ids.bos.filter(|&id| in_range(id)));
        let eos = gguf.token_id(KEY_EOS, tokens.len())?.or(default_ids.eos.filter(|&id| in_range(id)));
        let add_bos = gguf.bool(KEY_ADD_BOS)?.unwrap_or(default_add_bos);
        let mut extra_stops = Vec::new();
        for key in [KEY_EOT, KEY_EOM] {
            extra_stops.extend(gguf.token_id(key, tokens.len())?);
        }
        Self::assemble(inner, bos, eos, add_bos, &extra_stops)
    }

    /// Loads `tokenizer.json` from a Hugging Face model folder.
    ///
    /// `tokenizer_config.json`, if present, names the BOS and EOS tokens and says whether
    /// to prepend BOS (without it, BOS is prepended if `tokenizer.json`'s post-processor
    /// would add it). `generation_config.json`, if present, adds its `eos_token_id`s (an
    /// integer or a list) to the stop tokens.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read(&path).map_err(|source| Error::io(&path, source))?;
        let inner = tokenizers::Tokenizer::from_bytes(&json)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;

        let config = TokenizerConfig::read(&dir.join("tokenizer_config.json"))?;
        let known_id = |text: Option<&str>, key: &str| {
            let text = text?;
            let id = inner.token_to_id(text);
            if id.is_none() {
                tracing::warn!("tokenizer_config.json: {key} {text:?} is not in the vocabulary; ignoring it");
            }
            id
        };
        let configured_bos = known_id(config.bos_token.as_deref(), "bos_token");
        let configured_eos = known_id(config.eos_token.as_deref(), "eos_token");
        let post_processor_bos =
            post_processor_bos(&inner).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let bos = configured_bos.or(post_processor_bos);
        let add_bos = config.add_bos_token.unwrap_or(post_processor_bos.is_some());

        let generation_eos =
            generation_eos_ids(&dir.join("generation_config.json"), inner.get_vocab_size(true))?;
        let eos = configured_eos.or(generation_eos.first().copied());
        Self::assemble(inner, bos, eos, add_bos, &generation_eos)
    }

    /// Wraps a built tokenizer with its special tokens, and collects the stop tokens.
    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        extra_stop_ids: &[u32],
    ) -> Result<Self> {
        let special = |id: u32| {
            inner
                .id_to_token(id)
                .map(|text| SpecialToken { id, text })
                .ok_or_else(|| invalid(format!("special token id {id} is not in the vocabulary")))
        };
        let bos = bos.map(special).transpose()?;
        let eos = eos.map(special).transpose()?;
        if add_bos && bos.is_none() {
            return Err(invalid("the tokenizer asks for a BOS token to be prepended but names none".into()));
        }

        let added = inner.get_added_vocabulary();
        let end_of_turn = END_OF_TURN_TOKENS
            .iter()
            .filter(|text| added.is_special_token(text))
            .filter_map(|text| inner.token_to_id(text));
        let harmony = HARMONY_TURN_ENDS.iter().all(|text| added.is_special_token(text));
        let message_end = inner.token_to_id(HARMONY_MESSAGE_END).filter(|_| harmony);
        let mut stop_token_ids = Vec::new();
        for id in eos.iter().map(|t| t.id).chain(extra_stop_ids.iter().copied()).chain(end_of_turn) {
            if !stop_token_ids.contains(&id) && Some(id) != message_end {
                stop_token_ids.push(id);
            }
        }
        Ok(Self { inner, bos, eos, add_bos, stop_token_ids })
    }

    /// Encodes `text`. Text of special tokens (e.g. `<|im_start|>`) becomes their id, and
    /// BOS is prepended when the model asks for it. EOS is never appended.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // `false`: no post-processor tokens. BOS is added here instead, so GGUF and
        // Hugging Face tokenizers follow the same rule.
        let encoding = self.inner.encode_fast(text, false).map_err(tokenizer_error)?;
        let ids = encoding.get_ids();
        let bos = self.bos.as_ref().filter(|_| self.add_bos).map(|t| t.id);
        let mut out = Vec::with_capacity(ids.len() + usize::from(bos.is_some()));
        out.extend(bos);
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Decodes `ids` to text, skipping special tokens. Ids outside the vocabulary decode
    /// to nothing.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tokenizer_error)
    }

    /// An incremental decoder for streaming generated text, one id at a time.
    pub fn decode_stream(&self) -> TextStream<'_> {
        TextStream { inner: self.inner.decode_stream(true) }
    }

    /// Ids that end generation: EOS, the model's other end-of-generation ids, and the
    /// end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`...) the vocabulary has as special
    /// tokens.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// The text of the beginning-of-sequence token, if the model has one.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|t| t.text.as_str())
    }

    /// The text of the end-of-sequence token, if the model has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|t| t.text.as_str())
    }

    /// The number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer. Note that it has no post-processor adding
    /// BOS for GGUF models: use [`Tokenizer::encode`] for prompts.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl fmt::Debug for Tokenizer {
    // Not derived: the inner tokenizer would print the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("stop_token_ids", &self.stop_token_ids)
            .finish()
    }
}

/// Incremental detokenizer, from [`Tokenizer::decode_stream`].
///
/// Text is only released once it is final: a character whose UTF-8 bytes are split
/// across tokens comes out whole with the token that completes it, and decoders that
/// depend on context (such as SentencePiece's leading-space strip) see the whole stream.
pub struct TextStream<'a> {
    inner: InnerDecodeStream<'a>,
}

impl TextStream<'_> {
    /// Feeds one generated id; returns the text it completes, if any. Special tokens
    /// produce no text.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner.step(id).map_err(tokenizer_error)
    }
}

impl fmt::Debug for TextStream<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextStream").finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------
// GGUF vocabularies

/// A vocabulary's tokens and their types, index = id, lengths checked equal.
struct GgufVocab<'a> {
    tokens: &'a [&'a str],
    types: &'a [TokenType],
}

#[derive(Debug, Default, Clone, Copy)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            // 0 is "undefined", which llama.cpp treats as an ordinary token.
            0 | 1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

fn token_types(gguf: &Gguf<'_>, n_tokens: usize) -> Result<Vec<TokenType>> {
    let Some(codes) = gguf.integers(KEY_TOKEN_TYPE)? else {
        // As in llama.cpp: without types, every token is an ordinary one.
        return Ok(vec![TokenType::Normal; n_tokens]);
    };
    check_len(KEY_TOKEN_TYPE, codes.len(), n_tokens)?;
    codes
        .iter()
        .enumerate()
        .map(|(id, &code)| {
            TokenType::from_code(code).ok_or_else(|| {
                invalid(format!("GGUF metadata `{KEY_TOKEN_TYPE}`: token {id} has unknown type {code}"))
            })
        })
        .collect()
}

/// How llama.cpp splits text before BPE, for one family of `tokenizer.ggml.pre` values
/// (from `llm_tokenizer_bpe` and `llama_vocab::impl::load` in llama.cpp's
/// `src/llama-vocab.cpp`).
#[derive(Debug)]
struct PreTokenizerSpec {
    /// The `tokenizer.ggml.pre` values that select this spec, as llama.cpp spells them.
    names: &'static [&'static str],
    /// Applied one after another: each splits every piece so far into its matches and
    /// the text between them, keeping both (llama.cpp's `unicode_regex_split`).
    regexes: &'static [&'static str],
    /// A piece that is a whole token is emitted as is, without merging (Llama 3).
    ignore_merges: bool,
    /// Whether BOS is prepended when `tokenizer.ggml.add_bos_token` is absent.
    add_bos: bool,
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's regex; `(?i:'s|'t|...)` spelled out, as llama.cpp spells it.
const LLAMA3_REGEX: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// Llama 3's, with single digits.
/// GPT-4o's and gpt-oss's (`o200k`), as their `tokenizer.json` writes it: words carry
/// their case pattern and contraction, digits go in threes.
const GPT4O_REGEX: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// DeepSeek-V3's last split, after digits in threes and runs of CJK characters.
const DEEPSEEK3_REGEX: &str = concat!(
    r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"##,
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_REGEX: &str = concat!(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+",
    r"|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

const PRE_TOKENIZERS: &[PreTokenizerSpec] = &[
    PreTokenizerSpec {
        // Also what an absent `tokenizer.ggml.pre` means (llama.cpp warns that quality
        // will be degraded: these regexes match no real tokenizer).
        names: &["default"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        // "gpt2" is not a llama.cpp name, but an unambiguous one.
        names: &["gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"],
        regexes: &[GPT2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        // Every digit is a token of its own.
        names: &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
        regexes: &[r"\p{N}", GPT2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["llama-bpe", "llama3", "llama-v3", "falcon3"],
        regexes: &[LLAMA3_REGEX],
        ignore_merges: true,
        add_bos: true,
    },
    PreTokenizerSpec {
        names: &["dbrx", "smaug-bpe"],
        regexes: &[LLAMA3_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["gpt-4o", "llama4"],
        regexes: &[GPT4O_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["deepseek-v3"],
        regexes: &[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
    PreTokenizerSpec {
        names: &["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"],
        regexes: &[QWEN2_REGEX],
        ignore_merges: false,
        add_bos: false,
    },
];

impl PreTokenizerSpec {
    fn from_gguf(name: Option<&str>) -> Result<&'static Self> {
        let name = name.filter(|name| !name.is_empty()).unwrap_or_else(|| {
            tracing::warn!(
                "GGUF metadata has no `{KEY_PRE}`: splitting text with llama.cpp's \"default\" \
                 rules, which match no real tokenizer; output quality may suffer"
            );
            "default"
        });
        PRE_TOKENIZERS.iter().find(|spec| spec.names.contains(&name)).ok_or_else(|| {
            let supported: Vec<&str> = PRE_TOKENIZERS.iter().flat_map(|s| s.names).copied().collect();
            Error::Unsupported(format!(
                "pre-tokenizer `{name}` (`{KEY_PRE}`); supported: {}",
                supported.join(", ")
            ))
        })
    }

    /// The regex splits, then the mapping of bytes to byte-level characters.
    fn pre_tokenizer(&self) -> Result<PreTokenizerSequence> {
        let mut steps = Vec::with_capacity(self.regexes.len() + 1);
        for regex in self.regexes {
            let split =
                Split::new(SplitPattern::Regex((*regex).to_owned()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex {regex:?}: {e}")))?;
            steps.push(PreTokenizerWrapper::from(split));
        }
        // The regexes already split the text: no prefix space, no GPT-2 regex of its own.
        steps.push(ByteLevel::new(false, false, false).into());
        Ok(PreTokenizerSequence::new(steps))
    }
}

/// The vocabulary map. Where a text appears twice the last id wins, as in llama.cpp.
fn vocab_map(tokens: &[&str]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in (0u32..).zip(tokens) {
        if let Some(previous) = vocab.insert((*token).to_owned(), id) {
            tracing::warn!("token {token:?} appears twice in the vocabulary (ids {previous} and {id})");
        }
    }
    vocab
}

/// A `gpt2` vocabulary: byte-level BPE with llama.cpp's pre-tokenizer for the model.
fn byte_level_bpe(
    vocab: &GgufVocab<'_>,
    merges: &[&str],
    pre: &PreTokenizerSpec,
) -> Result<tokenizers::Tokenizer> {
    let map = vocab_map(vocab.tokens);
    let merges = parse_merges(merges, &map)?;
    // No unknown token: like llama.cpp, a character the vocabulary lacks is dropped.
    let bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build the BPE model: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre.pre_tokenizer()?));
    inner.with_decoder(Some(ByteLevel::default()));
    Ok(inner)
}

/// Parses `"left right"` merges, ranked by position.
///
/// A merge whose parts or result are not tokens cannot apply to any text llama.cpp
/// would turn into tokens; it is dropped with a warning rather than failing the load.
/// A repeated merge keeps its first rank, as in llama.cpp.
fn parse_merges(merges: &[&str], vocab: &Vocab) -> Result<Merges> {
    let mut parsed = Merges::with_capacity(merges.len());
    let mut seen = HashSet::with_capacity(merges.len());
    let mut unusable = 0usize;
    for (rank, merge) in merges.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte, so a left part may
        // itself be a space.
        let split = merge.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1).ok_or_else(|| {
            invalid(format!("GGUF metadata `{KEY_MERGES}`: merge {rank} ({merge:?}) has no space separator"))
        })?;
        let (left, right) = (&merge[..split], &merge[split + 1..]);
        let merged = [left, right].concat();
        if !(vocab.contains_key(left) && vocab.contains_key(right) && vocab.contains_key(&merged)) {
            unusable += 1;
            continue;
        }
        if seen.insert((left, right)) {
            parsed.push((left.to_owned(), right.to_owned()));
        }
    }
    if unusable > 0 {
        tracing::warn!("ignored {unusable} merges whose parts or result are not in the vocabulary");
    }
    Ok(parsed)
}

/// A `llama` (SentencePiece) vocabulary, rebuilt as Hugging Face's `LlamaConverter` does:
/// a byte-fallback BPE, spaces written as `▁`, and a `▁` prepended to the text.
fn sentencepiece_bpe(
    vocab: &GgufVocab<'_>,
    scores: Option<&[f32]>,
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let map = vocab_map(vocab.tokens);
    let merges = merges_from_scores(vocab.tokens, scores, &map);
    let mut builder = BPE::builder().byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk.and_then(|id| vocab.tokens.get(id as usize)) {
        builder = builder.unk_token((*unk).to_owned());
    }
    let bpe = builder
        .vocab_and_merges(map, merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build the BPE model: {e}")))?;

    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| Error::Tokenizer(format!("cannot build a Replace step: {e}")))
    };
    // llama.cpp prepends the space to every stretch of text between special tokens, which
    // is what a normalizer does: it runs on each stretch separately.
    let mut normalizers: Vec<NormalizerWrapper> = Vec::with_capacity(2);
    if add_space_prefix {
        normalizers.push(Prepend::new(SPM_SPACE.to_owned()).into());
    }
    normalizers.push(replace(" ", SPM_SPACE)?.into());

    let mut decoders: Vec<DecoderWrapper> =
        vec![replace(SPM_SPACE, " ")?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        // Takes back the prepended space, once, from the fused text.
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| Error::Tokenizer(format!("cannot set the normalizer: {e}")))?;
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

/// BPE merges implied by a SentencePiece vocabulary, ordered as Hugging Face's
/// `SentencePieceExtractor` orders them: every split of a token into two tokens is a
/// merge; merges rank by the merged token's score, best first, and ties keep vocabulary
/// order, then the order of the parts' ids. Without scores, vocabulary order decides.
fn merges_from_scores(tokens: &[&str], scores: Option<&[f32]>, vocab: &Vocab) -> Merges {
    struct Candidate<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
    }
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    for (id, token) in (0u32..).zip(tokens) {
        // A repeated text yields its merges once, at the id the vocabulary kept.
        if vocab.get(*token) != Some(&id) {
            continue;
        }
        let score = scores.and_then(|s| s.get(id as usize)).copied().unwrap_or(0.0);
        let start = candidates.len();
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                candidates.push(Candidate { left, right, score });
            }
        }
        candidates[start..].sort_by_key(|c| (vocab.get(c.left), vocab.get(c.right)));
    }
    // Stable: equal scores keep the order built above.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.into_iter().map(|c| (c.left.to_owned(), c.right.to_owned())).collect()
}

/// Registers control, unknown and user-defined tokens as added tokens, so that their
/// text is matched before any splitting, as llama.cpp does when it parses special tokens.
///
/// Control and unknown tokens are special (skipped by decoding); user-defined tokens are
/// not: llama.cpp prints their text.
fn register_added_tokens(inner: &mut tokenizers::Tokenizer, vocab: &GgufVocab<'_>) -> Result<()> {
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (token, kind) in vocab.tokens.iter().zip(vocab.types) {
        match kind {
            TokenType::Control | TokenType::Unknown => special.push(AddedToken::from(*token, true)),
            // Matched against the raw text, as GGUF stores these tokens unescaped.
            TokenType::UserDefined => user_defined.push(AddedToken::from(*token, false).normalized(false)),
            TokenType::Normal | TokenType::Unused | TokenType::Byte => {}
        }
    }
    inner
        .add_special_tokens(special)
        .and_then(|_| inner.add_tokens(user_defined))
        .map_err(|e| Error::Tokenizer(format!("cannot register the special tokens: {e}")))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Metadata access

/// Typed access to GGUF metadata. The metadata is untrusted input: every accessor checks
/// the value's type and reports a mismatch by key, without dumping the value.
struct Gguf<'a>(&'a HashMap<String, Value>);

impl<'a> Gguf<'a> {
    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(wrong_type(key, "a string", other)),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(wrong_type(key, "a boolean", other)),
        }
    }

    /// A token id. One outside the vocabulary is ignored with a warning, as llama.cpp
    /// ignores it.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        let Some(value) = self.0.get(key) else { return Ok(None) };
        let id = integer(value).ok_or_else(|| wrong_type(key, "an integer", value))?;
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n_tokens => Ok(Some(id)),
            _ => {
                tracing::warn!(
                    "GGUF metadata `{key}` = {id} is not a token id (vocabulary of {n_tokens}); ignoring it"
                );
                Ok(None)
            }
        }
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(wrong_type(key, "an array", other)),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        self.elements(key, "strings", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    fn integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.elements(key, "integers", integer)
    }

    fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.elements(key, "numbers", |v| match v {
            Value::F32(x) => Some(*x),
            // Scores are f32 in every known file; f64 would only lose precision it
            // never needed.
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })
    }

    fn elements<T>(
        &self,
        key: &str,
        what: &str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                convert(item).ok_or_else(|| {
                    invalid(format!(
                        "GGUF metadata `{key}` should be an array of {what}, but element {i} is {:?}",
                        item.value_type()
                    ))
                })
            })
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }
}

fn integer(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(x) => Some(x.into()),
        Value::I8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::I16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::I32(x) => Some(x.into()),
        Value::U64(x) => i64::try_from(x).ok(),
        Value::I64(x) => Some(x),
        _ => None,
    }
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> Error {
    invalid(format!("GGUF metadata `{key}` should be {expected}, found {:?}", found.value_type()))
}

fn check_len(key: &str, len: usize, n_tokens: usize) -> Result<()> {
    if len == n_tokens {
        Ok(())
    } else {
        Err(invalid(format!("GGUF metadata `{key}` has {len} entries but `{KEY_TOKENS}` has {n_tokens}")))
    }
}

/// Reads and parses a JSON file that may legitimately be absent.
pub(crate) fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::io(path, source)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| invalid(format!("{}: {e}", path.display())))
}

/// What `tokenizer_config.json` says about BOS and EOS.
#[derive(Debug, Default)]
struct TokenizerConfig {
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Reads `path`; an absent file says nothing.
    fn read(path: &Path) -> Result<Self> {
        let Some(config) = read_optional_json(path)? else { return Ok(Self::default()) };
        let add_bos_token = match config.get("add_bos_token") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Bool(add)) => Some(*add),
            Some(other) => {
                return Err(invalid(format!(
                    "{}: `add_bos_token` should be a boolean, found {other}",
                    path.display()
                )))
            }
        };
        Ok(Self {
            bos_token: special_token_text(&config, "bos_token", path)?.map(str::to_owned),
            eos_token: special_token_text(&config, "eos_token", path)?.map(str::to_owned),
            add_bos_token,
        })
    }
}

/// The token `tokenizer.json`'s post-processor prepends, if it prepends exactly one.
fn post_processor_bos(inner: &tokenizers::Tokenizer) -> tokenizers::Result<Option<u32>> {
    let with = inner.encode_fast("Hi", true)?;
    let without = inner.encode_fast("Hi", false)?;
    Ok(match with.get_ids().split_first() {
        Some((&first, rest)) if rest.starts_with(without.get_ids()) => Some(first),
        _ => None,
    })
}

/// `eos_token_id` of `generation_config.json` (an id or a list), if the file exists. Ids
/// outside the vocabulary are ignored with a warning.
fn generation_eos_ids(path: &Path, vocab_size: usize) -> Result<Vec<u32>> {
    let Some(config) = read_optional_json(path)? else { return Ok(Vec::new()) };
    let mut ids = token_ids(&config, "eos_token_id", path)?;
    ids.retain(|&id| {
        let known = (id as usize) < vocab_size;
        if !known {
            tracing::warn!("{}: eos_token_id {id} is outside the vocabulary; ignoring it", path.display());
        }
        known
    });
    Ok(ids)
}

/// A special token named in `tokenizer_config.json`: a string, or an added-token object
/// with a `content` field.
fn special_token_text<'a>(config: &'a serde_json::Value, key: &str, path: &Path) -> Result<Option<&'a str>> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text)),
        Some(serde_json::Value::Object(token)) => match token.get("content") {
            Some(serde_json::Value::String(text)) => Ok(Some(text)),
            _ => Err(invalid(format!("{}: `{key}` has no string `content`", path.display()))),
        },
        Some(other) => Err(invalid(format!(
            "{}: `{key}` should be a string or a token object, found {other}",
            path.display()
        ))),
    }
}

/// Token ids under `key`: an integer, a list of integers, or nothing.
fn token_ids(json: &serde_json::Value, key: &str, path: &Path) -> Result<Vec<u32>> {
    let bad = || invalid(format!("{}: `{key}` should be a token id or a list of token ids", path.display()));
    let id = |v: &serde_json::Value| v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(bad);
    match json.get(key) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(ids)) => ids.iter().map(id).collect(),
        Some(single) => Ok(vec![id(single)?]),
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidModel(message)
}

fn tokenizer_error(e: tokenizers::Error) -> Error {
    Error::Tokenizer(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String((*s).to_owned())).collect())
    }

    /// A tiny SentencePiece vocabulary: specials, byte tokens for `\n` and the bytes of
    /// `é`, pieces whose scores favour `▁h` + `ello`.
    fn spm_metadata() -> HashMap<String, Value> {
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "h", "e", "l", "o", "w", "r", "d",
            "▁h", "el", "ll", "lo", "ello", "▁hello", "▁w", "or", "ld", "▁wor", "▁world",
        ];
        let types: Vec<i32> = tokens
            .iter()
            .map(|t| match *t {
                "<unk>" => 2,
                "<s>" | "</s>" => 3,
                t if t.starts_with("<0x") => 6,
                _ => 1,
            })
            .collect();
        // Longer pieces score higher, as SentencePiece's do.
        let scores: Vec<f32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| t.chars().count() as f32 * 10.0 - i as f32 * 0.01)
            .collect();
        HashMap::from([
            (KEY_MODEL.to_owned(), Value::String("llama".into())),
            (KEY_TOKENS.to_owned(), strings(&tokens)),
            (KEY_TOKEN_TYPE.to_owned(), Value::Array(types.into_iter().map(Value::I32).collect())),
            (KEY_SCORES.to_owned(), Value::Array(scores.into_iter().map(Value::F32).collect())),
            (KEY_BOS.to_owned(), Value::U32(1)),
            (KEY_EOS.to_owned(), Value::U32(2)),
            (KEY_UNK.to_owned(), Value::U32(0)),
        ])
    }

    fn tiny_gpt2_metadata(pre: &str) -> HashMap<String, Value> {
        // Byte-level: `Ġ` is a space. Enough pieces to spell "hi 12" and "hi" with merges.
        let tokens = ["<|endoftext|>", "<|im_end|>", "h", "i", "Ġ", "1", "2", "hi", "Ġh", "Ġhi", "12"];
        let types = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        HashMap::from([
            (KEY_MODEL.to_owned(), Value::String("gpt2".into())),
            (KEY_PRE.to_owned(), Value::String(pre.into())),
            (KEY_TOKENS.to_owned(), strings(&tokens)),
            (KEY_TOKEN_TYPE.to_owned(), Value::Array(types.into_iter().map(Value::I32).collect())),
            (KEY_MERGES.to_owned(), strings(&["Ġ h", "Ġh i", "h i", "1 2"])),
            (KEY_EOS.to_owned(), Value::U32(0)),
        ])
    }

    /// gpt-oss stops at the end of its answer or of a tool call, not at the `<|end|>` of
    /// its reasoning; a vocabulary without harmony's turn ends (Phi-3's) stops at `<|end|>`.
    #[test]
    fn harmony_turns_end_at_return_or_call_not_at_a_messages_end() {
        let with = |extra: &[&str], eot: Option<u32>| {
            let mut metadata = tiny_gpt2_metadata("gpt-4o");
            let Some(Value::Array(tokens)) = metadata.get_mut(KEY_TOKENS) else { unreachable!() };
            tokens.extend(extra.iter().map(|t| Value::String((*t).into())));
            let Some(Value::Array(types)) = metadata.get_mut(KEY_TOKEN_TYPE) else { unreachable!() };
            types.extend(extra.iter().map(|_| Value::I32(3)));
            if let Some(eot) = eot {
                metadata.insert(KEY_EOT.to_owned(), Value::U32(eot));
            }
            Tokenizer::from_gguf(&metadata).unwrap()
        };
        // Ids 11, 12, 13 follow the tiny vocabulary's 11 tokens; GGUF names `<|end|>` as EOT.
        let gpt_oss = with(&["<|end|>", "<|return|>", "<|call|>"], Some(11));
        assert_eq!(gpt_oss.stop_token_ids(), [0, 1, 12, 13]);
        let phi3 = with(&["<|end|>"], None);
        assert_eq!(phi3.stop_token_ids(), [0, 1, 11]);
    }

    #[test]
    fn sentencepiece_splits_by_score_and_round_trips() {
        let tokenizer = Tokenizer::from_gguf(&spm_metadata()).unwrap();
        let ids = tokenizer.encode("hello world").unwrap();
        // BOS (a llama vocabulary's default), then the prepended-space pieces.
        let pieces: Vec<String> = ids.iter().map(|&id| tokenizer.inner().id_to_token(id).unwrap()).collect();
        assert_eq!(pieces, ["<s>", "▁hello", "▁world"]);
        assert_eq!(tokenizer.decode(&ids).unwrap(), "hello world");
        assert_eq!(tokenizer.bos_token(), Some("<s>"));
        assert_eq!(tokenizer.eos_token(), Some("</s>"));
        assert_eq!(tokenizer.stop_token_ids(), [2]);
    }

    #[test]
    fn sentencepiece_byte_fallback_and_specials() {
        let tokenizer = Tokenizer::from_gguf(&spm_metadata()).unwrap();
        let ids = tokenizer.encode("hé\n</s>").unwrap();
        let pieces: Vec<String> = ids.iter().map(|&id| tokenizer.inner().id_to_token(id).unwrap()).collect();
        assert_eq!(pieces, ["<s>", "▁h", "<0xC3>", "<0xA9>", "<0x0A>", "</s>"]);
        assert_eq!(tokenizer.decode(&ids).unwrap(), "hé\n");

        // Streaming holds the first byte of `é` back until the second completes it.
        let mut stream = tokenizer.decode_stream();
        let chunks: Vec<Option<String>> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
        assert_eq!(chunks, [None, Some("h".into()), None, Some("é".into()), Some("\n".into()), None]);
    }

    #[test]
    fn sentencepiece_without_space_prefix() {
        let mut metadata = spm_metadata();
        metadata.insert(KEY_ADD_SPACE_PREFIX.into(), Value::Bool(false));
        metadata.insert(KEY_ADD_BOS.into(), Value::Bool(false));
        let tokenizer = Tokenizer::from_gguf(&metadata).unwrap();
        let ids = tokenizer.encode("hello world").unwrap();
        let pieces: Vec<String> = ids.iter().map(|&id| tokenizer.inner().id_to_token(id).unwrap()).collect();
        assert_eq!(pieces, ["h", "ello", "▁world"]);
        assert_eq!(tokenizer.decode(&ids).unwrap(), "hello world");
    }

    #[test]
    fn merges_follow_scores_then_ids() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let vocab = vocab_map(&tokens);
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -0.5];
        let merges = merges_from_scores(&tokens, Some(&scores), &vocab);
        let merges: Vec<(&str, &str)> = merges.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        // "abc" (best score) splits as a+bc and ab+c; ordered by the left part's id.
        assert_eq!(merges, [("a", "bc"), ("ab", "c"), ("a", "b"), ("b", "c")]);
    }

    #[test]
    fn byte_level_has_no_prefix_space_and_matches_specials() {
        let tokenizer = Tokenizer::from_gguf(&tiny_gpt2_metadata("smollm")).unwrap();
        let piece = |id: u32| tokenizer.inner().id_to_token(id).unwrap();
        let ids = tokenizer.encode("hi hi 12<|im_end|>").unwrap();
        let pieces: Vec<String> = ids.iter().map(|&id| piece(id)).collect();
        // Digits split one by one, so the `1 2` merge never applies.
        assert_eq!(pieces, ["hi", "Ġhi", "Ġ", "1", "2", "<|im_end|>"]);
        assert_eq!(tokenizer.decode(&ids).unwrap(), "hi hi 12");
        // EOS, then <|im_end|> as a control end-of-turn token.
        assert_eq!(tokenizer.stop_token_ids(), [0, 1]);
        assert_eq!(tokenizer.bos_token(), None);

        // Without the digit rule, `12` merges.
        let tokenizer = Tokenizer::from_gguf(&tiny_gpt2_metadata("gpt-2")).unwrap();
        let ids = tokenizer.encode("12").unwrap();
        assert_eq!(ids, [10]);
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for spec in PRE_TOKENIZERS {
            spec.pre_tokenizer().unwrap_or_else(|e| panic!("{:?}: {e}", spec.names));
        }
    }

    #[test]
    fn pre_tokenizers_split_like_llama_cpp() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let split = |name: &str, text: &str| -> Vec<String> {
            let spec = PreTokenizerSpec::from_gguf(Some(name)).unwrap();
            let mut pretokenized = PreTokenizedString::from(text);
            spec.pre_tokenizer().unwrap().pre_tokenize(&mut pretokenized).unwrap();
            let splits = pretokenized.get_splits(OffsetReferential::Original, OffsetType::Byte);
            splits.into_iter().map(|(piece, _, _)| piece.to_owned()).collect()
        };
        let text = "Hello world 12345\n\nI'M OK";
        assert_eq!(split("llama-bpe", text), ["Hello", "Ġworld", "Ġ", "123", "45", "ĊĊ", "I", "'M", "ĠOK"]);
        assert_eq!(
            split("qwen2", text),
            ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "ĊĊ", "I", "'M", "ĠOK"]
        );
        // GPT-2's contractions are lowercase only.
        assert_eq!(
            split("smollm", text),
            ["Hello", "Ġworld", "Ġ", "1", "2", "3", "4", "5", "Ċ", "Ċ", "I", "'", "M", "ĠOK"]
        );
        assert_eq!(split("gpt-2", text), ["Hello", "Ġworld", "Ġ12345", "Ċ", "Ċ", "I", "'", "M", "ĠOK"]);
        // Punctuation first, then GPT-2, then numbers, then groups of three digits.
        assert_eq!(
            split("default", text),
            ["Hello", "Ġworld", "Ġ", "123", "45", "Ċ", "Ċ", "I", "'", "M", "ĠOK"]
        );
        // gpt-oss: a word keeps its contraction; digits in threes.
        assert_eq!(split("gpt-4o", text), ["Hello", "Ġworld", "Ġ", "123", "45", "ĊĊ", "I'M", "ĠOK"]);
        assert_eq!(split("gpt-4o", "the CamelCase x/y\n"), ["the", "ĠCamel", "Case", "Ġx", "/y", "Ċ"]);
        // DeepSeek-V3: punctuation followed by letters stays with them; CJK runs alone.
        assert_eq!(split("deepseek-v3", "Hi.You 12345 日本語ok"), ["Hi", ".You", "Ġ", "123", "45", "Ġ", "æĹ¥æľ¬èªŀ", "ok"]);
        // An empty name is a missing one, as in llama.cpp.
        assert_eq!(split("", "a1"), split("default", "a1"));
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused_by_name() {
        let err = Tokenizer::from_gguf(&tiny_gpt2_metadata("mystery")).unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported(m) if m.contains("mystery") && m.contains("smollm")),
            "{err}"
        );
    }

    #[test]
    fn bad_metadata_is_a_clear_error() {
        let mut metadata = tiny_gpt2_metadata("smollm");
        metadata.insert(KEY_TOKEN_TYPE.into(), Value::Array(vec![Value::I32(1)]));
        let err = Tokenizer::from_gguf(&metadata).unwrap_err();
        assert!(matches!(&err, Error::InvalidModel(m) if m.contains("has 1 entries")), "{err}");

        let mut metadata = tiny_gpt2_metadata("smollm");
        metadata.insert(KEY_TOKENS.into(), Value::U32(3));
        let err = Tokenizer::from_gguf(&metadata).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidModel(m) if m.contains(KEY_TOKENS) && m.contains("array")),
            "{err}"
        );

        let mut metadata = tiny_gpt2_metadata("smollm");
        metadata.insert(KEY_MERGES.into(), strings(&["hi"]));
        let err = Tokenizer::from_gguf(&metadata).unwrap_err();
        assert!(matches!(&err, Error::InvalidModel(m) if m.contains("separator")), "{err}");

        let mut metadata = tiny_gpt2_metadata("smollm");
        metadata.insert(KEY_ADD_BOS.into(), Value::Bool(true));
        let err = Tokenizer::from_gguf(&metadata).unwrap_err();
        assert!(matches!(&err, Error::InvalidModel(m) if m.contains("BOS")), "{err}");

        let mut metadata = tiny_gpt2_metadata("smollm");
        metadata.insert(KEY_MODEL.into(), Value::String("bert".into()));
        assert!(matches!(Tokenizer::from_gguf(&metadata), Err(Error::Unsupported(_))));

        assert!(matches!(Tokenizer::from_gguf(&HashMap::new()), Err(Error::InvalidModel(_))));
    }

    #[test]
    fn hf_folder_reads_the_configs() {
        let dir = std::env::temp_dir().join(format!(
            "hearth-tokenizer-hf-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Tokenizer::from_gguf(&tiny_gpt2_metadata("smollm"))
            .unwrap()
            .inner()
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>", "add_bos_token": true}"#,
        )
        .unwrap();
        std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": [1, 0]}"#).unwrap();

        let tokenizer = Tokenizer::from_hf_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let tokenizer = tokenizer.unwrap();
        assert_eq!(tokenizer.bos_token(), Some("<|endoftext|>"));
        assert_eq!(tokenizer.eos_token(), Some("<|im_end|>"));
        assert_eq!(tokenizer.encode("hi").unwrap(), [0, 7]);
        assert_eq!(tokenizer.stop_token_ids(), [1, 0]);
    }

    #[test]
    fn hf_folder_bos_comes_from_the_post_processor_without_config() {
        use tokenizers::processors::template::TemplateProcessing;
        for (template, bos) in [("<|endoftext|> $A", Some("<|endoftext|>")), ("$A <|im_end|>", None)] {
            let dir = std::env::temp_dir().join(format!(
                "hearth-tokenizer-post-{}-{:?}-{}",
                std::process::id(),
                std::thread::current().id(),
                bos.is_some()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut inner = Tokenizer::from_gguf(&tiny_gpt2_metadata("smollm")).unwrap().inner().clone();
            let post_processor = TemplateProcessing::builder()
                .try_single(template)
                .unwrap()
                .special_tokens(vec![("<|endoftext|>", 0), ("<|im_end|>", 1)])
                .build()
                .unwrap();
            inner.with_post_processor(Some(post_processor));
            inner.save(dir.join("tokenizer.json"), false).unwrap();

            let tokenizer = Tokenizer::from_hf_dir(&dir);
            std::fs::remove_dir_all(&dir).unwrap();
            let tokenizer = tokenizer.unwrap();
            assert_eq!(tokenizer.bos_token(), bos, "{template}");
            let expected: &[u32] = if bos.is_some() { &[0, 7] } else { &[7] };
            // EOS is never appended, whatever the post-processor says.
            assert_eq!(tokenizer.encode("hi").unwrap(), expected, "{template}");
        }
    }

    #[test]
    fn hf_folder_without_tokenizer_json_is_an_io_error() {
        let dir = std::env::temp_dir().join("hearth-tokenizer-no-such-folder");
        assert!(matches!(Tokenizer::from_hf_dir(&dir), Err(Error::Io { .. })));
    }
}
