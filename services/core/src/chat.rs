//! Chat templates: a model's Jinja `chat_template` (from `tokenizer_config.json`, or a file that
//! overrides it) rendered with minijinja into the prompt text, configured the way Hugging Face
//! transformers' `apply_chat_template` configures Jinja2, so a conversation becomes the same
//! string (and, tokenized without an added BOS, the same token ids) as it does there.

use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, syntax::SyntaxConfig};

use crate::error::{CoreError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template and the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` and `eos_token` are the texts the template sees.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // What transformers sets: ImmutableSandboxedEnvironment(trim_blocks=True,
        // lstrip_blocks=True, extensions=[loopcontrols]), a `raise_exception` global and a
        // `tojson` filter that does not escape HTML (minijinja's own does).
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| CoreError::InvalidInput(template_error(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| {
                CoreError::InvalidInput(format!("chat template: {}", template_error(&e)))
            })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The template of a model dir: `override_source` (a `--chat-template` file's text) if
    /// given, else `tokenizer_config.json`'s `chat_template` (a string, or HF's list of named
    /// templates, of which `default` is used). `None`: the model has no chat template.
    pub fn from_model_dir(dir: &Path, override_source: Option<&str>) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
            serde_json::from_str(&text).map_err(|e| CoreError::Config {
                path: path.clone(),
                msg: format!("not valid JSON: {e}"),
            })?
        } else {
            serde_json::Value::Null
        };
        let source = match override_source {
            Some(s) => Some(s.to_owned()),
            None => template_source(&cfg["chat_template"]).map_err(|msg| CoreError::Config {
                path: path.clone(),
                msg,
            })?,
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let bos = token_text(&cfg["bos_token"]);
        let eos = token_text(&cfg["eos_token"]);
        ChatTemplate::new(&source, &bos, &eos)
            .map(Some)
            .map_err(|e| CoreError::Config {
                path,
                msg: format!("chat template: {e}"),
            })
    }

    /// The prompt text of `messages`; with `add_generation_prompt` the template appends the
    /// cue for the assistant's reply. Errors (the template's `raise_exception`, say for roles
    /// out of order) are `InvalidInput` naming `messages`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                minijinja::context! {
                    role => m.role.as_str(),
                    content => m.content.as_str(),
                }
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| CoreError::InvalidInput(format!("messages: {}", template_error(&e))))?;
        tmpl.render(ctx)
            .map_err(|e| CoreError::InvalidInput(format!("messages: {}", template_error(&e))))
    }
}

/// `chat_template` of a tokenizer config: absent/null → None; a string; or a list of
/// `{"name", "template"}` (transformers picks `default`).
fn template_source(v: &serde_json::Value) -> std::result::Result<Option<String>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| "chat_template: a list of templates without one named `default`".into()),
        _ => Err("chat_template: expected a string or a list of named templates".into()),
    }
}

/// A special token as tokenizer configs write it: a string, or an AddedToken object with
/// `content`. Missing: empty (what the template then renders).
fn token_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

/// The error and, where minijinja has one, its cause (a `raise_exception` message is the
/// detail itself).
fn template_error(e: &Error) -> String {
    match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_owned(),
        _ => e.to_string(),
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)`, so Python's
/// separators (`", "`, `": "`) and no HTML escaping.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&f.to_string());
                }
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<Value> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &k.to_string());
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {other} value"),
            ));
        }
    }
    Ok(())
}

/// A JSON string as Python's json.dumps(ensure_ascii=False) writes it.
fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ]
    }

    #[test]
    fn renders_with_special_tokens_and_generation_prompt() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m.content }}\n{% endfor %}\
             {% if add_generation_prompt %}assistant:{% endif %}",
            "<s>",
            "</s>",
        )
        .expect("compiles");
        assert_eq!(
            t.render(&conv(), true).expect("renders"),
            "<s>system: Be brief.\nuser: Hi\nassistant:"
        );
        assert_eq!(
            t.render(&conv(), false).expect("renders"),
            "<s>system: Be brief.\nuser: Hi\n"
        );
    }

    #[test]
    fn raise_exception_is_an_invalid_input_naming_messages() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}",
            "",
            "",
        )
        .expect("compiles");
        let e = t.render(&conv(), true).expect_err("raises");
        assert!(matches!(e, CoreError::InvalidInput(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "invalid input: messages: System role not supported"
        );
    }

    #[test]
    fn a_syntax_error_is_reported_at_compile_time() {
        let e = ChatTemplate::new("{% for m in messages %}", "", "").expect_err("unclosed for");
        assert!(e.to_string().contains("chat template") || e.to_string().contains("for"));
    }

    #[test]
    fn python_string_methods_loop_controls_and_tojson_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
             {{ m.content.strip().upper() }}|{{ {'a': [1, 2.0, none, true], 'b': '<\"x\">\n'} | tojson }}\
             {% endfor %}",
            "",
            "",
        )
        .expect("compiles");
        let out = t
            .render(
                &[
                    ChatMessage::new("user", "  hi  "),
                    ChatMessage::new("user", "no"),
                ],
                true,
            )
            .expect("renders");
        assert_eq!(
            out,
            "HI|{\"a\": [1, 2.0, null, true], \"b\": \"<\\\"x\\\">\\n\"}"
        );
    }

    #[test]
    fn the_template_comes_from_tokenizer_config_or_the_override() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = serde_json::json!({
            "bos_token": {"content": "<B>", "special": true},
            "eos_token": "<E>",
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).expect("write");
        let t = ChatTemplate::from_model_dir(dir.path(), None)
            .expect("loads")
            .expect("has a template");
        assert_eq!(t.render(&conv(), true).expect("renders"), "<B>Be brief.<E>");
        let t = ChatTemplate::from_model_dir(dir.path(), Some("[{{ messages | length }}]"))
            .expect("loads")
            .expect("override");
        assert_eq!(t.render(&conv(), true).expect("renders"), "[2]");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<B>"}"#,
        )
        .expect("write");
        assert!(
            ChatTemplate::from_model_dir(dir.path(), None)
                .expect("loads")
                .is_none()
        );
    }
}
