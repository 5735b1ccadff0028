//! Chat templates: turning a conversation into the prompt text a chat model was trained on.
//!
//! Templates are Jinja, shipped with the model (GGUF `tokenizer.chat_template`, or
//! `tokenizer_config.json` / `chat_template.jinja` in a Hugging Face folder). They are
//! rendered with minijinja configured to behave like the jinja2 environment Hugging Face
//! `transformers` renders them in: `trim_blocks` and `lstrip_blocks`, loop controls,
//! Python string and dict methods, `raise_exception`, `strftime_now`, a `tojson` that
//! writes JSON the way Python's `json.dumps` does, and the context variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, `tools` and `documents`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::Path;

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind};
use serde::Serialize;

use crate::tokenizer::{read_optional_json, Tokenizer};
use crate::{Error, Result};

const TEMPLATE_NAME: &str = "chat";
const GGUF_KEY: &str = "tokenizer.chat_template";

/// The ChatML template, for models that ship none.
const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One turn of a conversation.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others, such as `tool`).
    pub role: String,
    pub content: String,
}

/// A compiled chat template, with the special tokens it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles a template. `bos_token` and `eos_token` are the texts templates see as
    /// `bos_token` and `eos_token`; when `None`, those variables are undefined, as they
    /// are in `transformers` for a tokenizer without them.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        configure_like_transformers(&mut env);
        env.add_template_owned(TEMPLATE_NAME, neutralize_generation_tags(source).into_owned())
            .map_err(|e| template_error("cannot compile the chat template", &e))?;
        Ok(Self { env, bos_token: bos_token.map(str::to_owned), eos_token: eos_token.map(str::to_owned) })
    }

    /// The template in a GGUF file's `tokenizer.chat_template`, if it has one.
    pub fn from_gguf(
        metadata: &HashMap<String, gguf_file::Value>,
        tokenizer: &Tokenizer,
    ) -> Result<Option<Self>> {
        match metadata.get(GGUF_KEY) {
            None => Ok(None),
            Some(gguf_file::Value::String(source)) => {
                Self::new(source, tokenizer.bos_token(), tokenizer.eos_token()).map(Some)
            }
            Some(other) => Err(Error::InvalidModel(format!(
                "GGUF metadata `{GGUF_KEY}` should be a string, found {:?}",
                other.value_type()
            ))),
        }
    }

    /// The template of a Hugging Face model folder, if it has one: `chat_template.jinja`,
    /// else `chat_template` in `tokenizer_config.json` (a string, or a list of
    /// `{name, template}` of which the one named `default` is used).
    pub fn from_hf_dir(dir: &Path, tokenizer: &Tokenizer) -> Result<Option<Self>> {
        let compile =
            |source: &str| Self::new(source, tokenizer.bos_token(), tokenizer.eos_token()).map(Some);

        // Recent `transformers` saves the template to its own file, which then wins.
        let jinja_path = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja_path) {
            Ok(source) => return compile(&source),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::io(&jinja_path, source)),
        }

        let config_path = dir.join("tokenizer_config.json");
        let Some(config) = read_optional_json(&config_path)? else { return Ok(None) };
        match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(source)) => compile(source),
            Some(serde_json::Value::Array(templates)) => {
                let mut names = Vec::with_capacity(templates.len());
                for entry in templates {
                    let name = entry.get("name").and_then(serde_json::Value::as_str);
                    let source = entry.get("template").and_then(serde_json::Value::as_str);
                    let (Some(name), Some(source)) = (name, source) else {
                        return Err(Error::InvalidModel(format!(
                            "{}: every entry of the `chat_template` list needs a string `name` and `template`",
                            config_path.display()
                        )));
                    };
                    if name == "default" {
                        return compile(source);
                    }
                    names.push(name);
                }
                Err(Error::ChatTemplate(format!(
                    "{} lists chat templates ({}) but none named \"default\"",
                    config_path.display(),
                    names.join(", ")
                )))
            }
            Some(other) => Err(Error::InvalidModel(format!(
                "{}: `chat_template` should be a string or a list of named templates, found {other}",
                config_path.display()
            ))),
        }
    }

    /// A plain ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), for models that
    /// ship none.
    pub fn chatml() -> Self {
        // No input reaches this: the source is a constant, and a unit test compiles it.
        Self::new(CHATML, None, None).expect("the built-in ChatML template compiles")
    }

    /// Renders `messages` into prompt text. With `add_generation_prompt`, the text ends
    /// with the header of an assistant turn, for the model to write the turn.
    ///
    /// Errors raised by the template (`raise_exception`, e.g. for an unsupported role
    /// order) come back as [`Error::ChatTemplate`] with the template's message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let token = |text: &Option<String>| text.as_deref().map_or(Value::UNDEFINED, Value::from);
        let context = Value::from_iter([
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("bos_token", token(&self.bos_token)),
            ("eos_token", token(&self.eos_token)),
            // `transformers` passes these as None when the caller gives none.
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ]);
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(context))
            .map_err(|e| template_error("cannot render the chat template", &e))
    }
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Makes `env` render like `transformers`' `ImmutableSandboxedEnvironment(trim_blocks=True,
/// lstrip_blocks=True, extensions=[loopcontrols])` with its extra globals and filters.
fn configure_like_transformers(env: &mut Environment<'static>) {
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Prompts are not HTML, whatever a template's name would suggest.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(env);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    // Replaces minijinja's HTML-safe `tojson`, which writes `<` as `\u003c`.
    env.add_filter("tojson", tojson);
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Formats the current time (UTC) with a C `strftime` format.
fn strftime_now(format: &str) -> Result<String, minijinja::Error> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| minijinja::Error::new(ErrorKind::InvalidOperation, "the system clock is before 1970"))?;
    let seconds = i64::try_from(now.as_secs()).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "the system clock is out of range")
    })?;
    Ok(strftime(format, seconds))
}

/// `strftime` for a UTC time in seconds since the Unix epoch. Supports the directives
/// chat templates use (`%Y %y %m %d %e %H %I %M %S %p %j %a %A %b %B %h %%`), with glibc's
/// `-` flag to drop padding; any other directive is written as is.
fn strftime(format: &str, seconds: i64) -> String {
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = seconds.div_euclid(86_400);
    let second_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (second_of_day / 3600, second_of_day / 60 % 60, second_of_day % 60);
    // 1970-01-01 was a Thursday.
    let weekday = DAYS[(days + 4).rem_euclid(7) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let pad = chars.next_if_eq(&'-').is_none();
        let number =
            |value: i64, width: usize| if pad { format!("{value:0width$}") } else { value.to_string() };
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&number(year.rem_euclid(100), 2)),
            Some('m') => out.push_str(&number(month, 2)),
            Some('d') => out.push_str(&number(day, 2)),
            Some('e') => out.push_str(&if pad { format!("{day:2}") } else { day.to_string() }),
            Some('H') => out.push_str(&number(hour, 2)),
            Some('I') => out.push_str(&number((hour + 11) % 12 + 1, 2)),
            Some('M') => out.push_str(&number(minute, 2)),
            Some('S') => out.push_str(&number(second, 2)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&number(day_of_year, 3)),
            Some('a') => out.push_str(&weekday[..3]),
            Some('A') => out.push_str(weekday),
            Some('b' | 'h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of a day counted from 1970-01-01, proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to a date, the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// `transformers`' `tojson`: Python's `json.dumps(value, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, each overridable by keyword. Unlike minijinja's
/// filter, it writes `", "` and `": "` between items (the prompt must match the one the
/// model was trained on) and does not escape HTML characters.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let invalid =
        |message: &str| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {message}"));
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(indent) if indent.is_none() => None,
        Some(indent) => Some(match (indent.as_str(), indent.as_i64()) {
            (Some(text), _) => text.to_owned(),
            (None, Some(width)) => " ".repeat(usize::try_from(width).unwrap_or(0)),
            _ => return Err(invalid("indent must be an integer or a string")),
        }),
    };
    let (item_separator, key_separator) = match separators {
        Some(separators) if !separators.is_none() => {
            let pair: Vec<Value> = separators.try_iter()?.collect();
            match pair.as_slice() {
                [item, key] => match (item.as_str(), key.as_str()) {
                    (Some(item), Some(key)) => (item.to_owned(), key.to_owned()),
                    _ => return Err(invalid("separators must be two strings")),
                },
                _ => return Err(invalid("separators must be two strings")),
            }
        }
        // Python drops the space after commas once lines break.
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let value = if sort_keys.unwrap_or(false) { sorted_keys(value)? } else { value.clone() };

    let formatter = PythonJson {
        indent: indent.as_deref(),
        item_separator: &item_separator,
        key_separator: &key_separator,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        depth: 0,
        has_value: false,
    };
    let mut out = Vec::new();
    value
        .serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        .map_err(|e| invalid("cannot serialize the value").with_source(e))?;
    let json = String::from_utf8(out).map_err(|e| invalid("wrote invalid UTF-8").with_source(e))?;
    Ok(Value::from_safe_string(json))
}

/// A copy of `value` with every map's keys in sorted order.
fn sorted_keys(value: &Value) -> Result<Value, minijinja::Error> {
    match value.kind() {
        ValueKind::Map => {
            let mut entries = value
                .try_iter()?
                .map(|key| Ok((value.get_item(&key).and_then(|v| sorted_keys(&v))?, key)))
                .collect::<Result<Vec<(Value, Value)>, minijinja::Error>>()?;
            entries.sort_by(|a, b| a.1.cmp(&b.1));
            Ok(entries.into_iter().map(|(v, k)| (k, v)).collect())
        }
        ValueKind::Seq => value.try_iter()?.map(|item| sorted_keys(&item)).collect(),
        _ => Ok(value.clone()),
    }
}

/// A `serde_json` formatter with Python `json.dumps` layout.
struct PythonJson<'a> {
    /// Indentation per level; `None` writes everything on one line.
    indent: Option<&'a str>,
    item_separator: &'a str,
    key_separator: &'a str,
    /// Escape everything outside printable ASCII as `\uXXXX`, as Python does by default.
    ensure_ascii: bool,
    depth: usize,
    /// Whether the innermost open container has items (empty ones stay `[]` / `{}`).
    has_value: bool,
}

impl PythonJson<'_> {
    fn newline<W: ?Sized + io::Write>(&self, writer: &mut W) -> io::Result<()> {
        if let Some(indent) = self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.depth {
                writer.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        writer.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, writer: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(writer)?;
        }
        writer.write_all(bracket)
    }

    fn item<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        if !first {
            writer.write_all(self.item_separator.as_bytes())?;
        }
        self.newline(writer)
    }
}

impl serde_json::ser::Formatter for PythonJson<'_> {
    fn begin_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.item(writer, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(writer, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, writer: &mut W, first: bool) -> io::Result<()> {
        self.item(writer, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(self.key_separator.as_bytes())
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if !self.ensure_ascii {
            return writer.write_all(fragment.as_bytes());
        }
        // Control characters, quotes and backslashes never reach here: serde_json
        // escapes them itself, as Python does.
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                writer.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// Rewrites `transformers`' `{% generation %}` / `{% endgeneration %}` tags, which mark
/// assistant text for training masks and render their body unchanged, into an always-true
/// `if` block that minijinja understands. Whitespace-control markers are kept.
fn neutralize_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match generation_tag(tag) {
            Some((length, replacement)) => {
                out.push_str(&replacement);
                rest = &tag[length..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// If `tag` starts with a `generation` or `endgeneration` tag: its length, and the tag to
/// write instead.
fn generation_tag(tag: &str) -> Option<(usize, String)> {
    fn whitespace_control(text: &str) -> (&str, &str) {
        match text.as_bytes().first() {
            Some(b'-' | b'+') => text.split_at(1),
            _ => ("", text),
        }
    }
    let (open, body) = whitespace_control(tag.strip_prefix("{%")?);
    let body = body.trim_start();
    let (keyword, after) = if let Some(after) = body.strip_prefix("endgeneration") {
        ("endif", after)
    } else if let Some(after) = body.strip_prefix("generation") {
        ("if true", after)
    } else {
        return None;
    };
    let (close, after) = whitespace_control(after.trim_start());
    let after = after.strip_prefix("%}")?;
    Some((tag.len() - after.len(), format!("{{%{open} {keyword} {close}%}}")))
}

/// A chat-template error, with minijinja's description and the chain of causes.
fn template_error(context: &str, error: &minijinja::Error) -> Error {
    let mut message = format!("{context}: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    Error::ChatTemplate(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(content: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: content.into() }
    }

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(source, Some("<s>"), Some("</s>"))?.render(messages, true)
    }

    /// A folder with the given files, removed when dropped.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn with_files(files: &[(&str, &str)]) -> Self {
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("hearth-chat-template-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for (name, content) in files {
                std::fs::write(dir.join(name), content).unwrap();
            }
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn chatml_tokenizer() -> Tokenizer {
        use candle_core::quantized::gguf_file::Value as G;
        let tokens = ["<|im_start|>", "<|im_end|>", "a"];
        let metadata = HashMap::from([
            ("tokenizer.ggml.model".to_owned(), G::String("gpt2".into())),
            ("tokenizer.ggml.pre".to_owned(), G::String("smollm".into())),
            (
                "tokenizer.ggml.tokens".to_owned(),
                G::Array(tokens.iter().map(|t| G::String((*t).into())).collect()),
            ),
            ("tokenizer.ggml.token_type".to_owned(), G::Array(vec![G::I32(3), G::I32(3), G::I32(1)])),
            ("tokenizer.ggml.merges".to_owned(), G::Array(vec![])),
            ("tokenizer.ggml.bos_token_id".to_owned(), G::U32(0)),
            ("tokenizer.ggml.eos_token_id".to_owned(), G::U32(1)),
        ]);
        Tokenizer::from_gguf(&metadata).unwrap()
    }

    #[test]
    fn chatml_renders() {
        let messages = [ChatMessage { role: "system".into(), content: "Be brief.".into() }, user("Hi")];
        assert_eq!(
            ChatTemplate::chatml().render(&messages, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::chatml().render(&messages[1..], false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        // trim_blocks eats the newline after a tag; lstrip_blocks the indentation before.
        let source = "{% for m in messages %}\n    {% if loop.first %}\n[{{ bos_token }}]{% endif %}\n{{ m.content }}\n{% endfor %}";
        assert_eq!(render(source, &[user("a"), user("b")]).unwrap(), "[<s>]a\nb\n");
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let source = "{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}\
            {% if m['content'].strip().startswith('skip') %}{% continue %}{% endif %}\
            {{ m['content'].strip().upper() }}|{{ m.content.split(',')|length }};{% endfor %}";
        let messages = [user("  x,y  "), user("skip me"), user("z"), user("never")];
        assert_eq!(render(source, &messages).unwrap(), "X,Y|2;Z|1;");
    }

    #[test]
    fn raise_exception_is_a_chat_template_error() {
        let source = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}";
        let err = render(source, &[user("hi")]).unwrap_err();
        assert!(
            matches!(&err, Error::ChatTemplate(m) if m.contains("Conversation roles must alternate")),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_are_chat_template_errors() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)), "{err}");
    }

    #[test]
    fn tojson_writes_like_python() {
        let source = r#"{{ {"name": "é<&>", "n": [1, 2.5, true, none], "empty": {}} | tojson }}"#;
        assert_eq!(
            render(source, &[]).unwrap(),
            r#"{"name": "é<&>", "n": [1, 2.5, true, null], "empty": {}}"#
        );

        // json.dumps(..., indent=2, ensure_ascii=True, sort_keys=True)
        let source =
            r#"{{ {"b": ["x\n"], "a": "é😀"} | tojson(indent=2, ensure_ascii=true, sort_keys=true) }}"#;
        assert_eq!(
            render(source, &[]).unwrap(),
            "{\n  \"a\": \"\\u00e9\\ud83d\\ude00\",\n  \"b\": [\n    \"x\\n\"\n  ]\n}"
        );

        let source = r#"{{ [1, {"a": 2}] | tojson(separators=[",", ":"]) }}"#;
        assert_eq!(render(source, &[]).unwrap(), r#"[1,{"a":2}]"#);
    }

    #[test]
    fn undefined_tokens_and_default_variables() {
        let source =
            "[{{ bos_token }}]{% if tools is not none %}tools{% endif %}{% if documents %}docs{% endif %}\
            {% if eos_token is defined %}eos{% endif %}";
        let template = ChatTemplate::new(source, None, Some("</s>")).unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "[]eos");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let source =
            "{% for m in messages %}{%- generation -%}\n<{{ m.content }}>\n{%- endgeneration %}{% endfor %}";
        assert_eq!(render(source, &[user("a"), user("b")]).unwrap(), "<a><b>");
        assert_eq!(neutralize_generation_tags("{{ generation }}"), "{{ generation }}");
        assert_eq!(neutralize_generation_tags("{% generation_x %}"), "{% generation_x %}");
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_721_999_109;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %y %H:%M:%S %I%p day %j %%", t),
            "Friday July 26, 24 13:05:09 01PM day 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        assert_eq!(strftime("%Q", 0), "%Q");
        // The function itself works on the real clock.
        assert_eq!(render("{{ strftime_now('%Y')|length }}", &[]).unwrap(), "4");
    }

    #[test]
    fn tokenizer_config_template_as_string() {
        let dir = TempDir::with_files(&[(
            "tokenizer_config.json",
            r#"{"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}"#,
        )]);
        let template = ChatTemplate::from_hf_dir(&dir.0, &chatml_tokenizer()).unwrap().unwrap();
        assert_eq!(template.render(&[user("a")], false).unwrap(), "<|im_start|>a<|im_end|>");
    }

    #[test]
    fn tokenizer_config_template_as_list_uses_default() {
        let dir = TempDir::with_files(&[(
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]}"#,
        )]);
        let template = ChatTemplate::from_hf_dir(&dir.0, &chatml_tokenizer()).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "default");

        let dir = TempDir::with_files(&[(
            "tokenizer_config.json",
            r#"{"chat_template": [{"name": "tool_use", "template": "tools"}]}"#,
        )]);
        let err = ChatTemplate::from_hf_dir(&dir.0, &chatml_tokenizer()).unwrap_err();
        assert!(matches!(&err, Error::ChatTemplate(m) if m.contains("tool_use")), "{err}");
    }

    #[test]
    fn chat_template_file_wins_and_absence_is_none() {
        let dir = TempDir::with_files(&[
            ("tokenizer_config.json", r#"{"chat_template": "from config"}"#),
            ("chat_template.jinja", "from file"),
        ]);
        let template = ChatTemplate::from_hf_dir(&dir.0, &chatml_tokenizer()).unwrap().unwrap();
        assert_eq!(template.render(&[], false).unwrap(), "from file");

        let dir = TempDir::with_files(&[("tokenizer_config.json", r#"{"model_max_length": 2048}"#)]);
        assert!(ChatTemplate::from_hf_dir(&dir.0, &chatml_tokenizer()).unwrap().is_none());
        let dir = TempDir::with_files(&[]);
        assert!(ChatTemplate::from_hf_dir(&dir.0, &chatml_tokenizer()).unwrap().is_none());
    }

    #[test]
    fn gguf_template_must_be_a_string() {
        let tokenizer = chatml_tokenizer();
        let metadata = HashMap::from([(GGUF_KEY.to_owned(), gguf_file::Value::U32(1))]);
        assert!(matches!(ChatTemplate::from_gguf(&metadata, &tokenizer), Err(Error::InvalidModel(_))));
        assert!(ChatTemplate::from_gguf(&HashMap::new(), &tokenizer).unwrap().is_none());
    }
}
