//! MMLU the way hendrycks' evaluation (and TensorRT-LLM's examples/mmlu.py, which adapts it)
//! does it: the hendrycks CSV layout, the k-shot prompt format, the subject → subcategory →
//! category mapping and the printed summary; the answer is the choice whose continuation
//! (" A", " B", " C", " D") has the highest log-probability, scored with the router's
//! prompt_logprobs. Only the candidate's tokens are scored, so each request skips the logprobs
//! of what comes before them (prompt_logprobs_skip_tokens) and the router can take that shared
//! part (the subject's few-shot header, the question) from its prefix cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::client::{Client, Progress, greedy_request};
use crate::dataset::{LineIndex, csv_error};
use crate::error::{EvalError, Result};

pub const CHOICES: [&str; 4] = ["A", "B", "C", "D"];

/// Subject → subcategory, in the order of mmlu.py's `get_subcategories()` (the subcategory
/// lines print in the order subcategories first appear here).
pub const SUBCATEGORIES: [(&str, &str); 57] = [
    ("abstract_algebra", "math"),
    ("anatomy", "health"),
    ("astronomy", "physics"),
    ("business_ethics", "business"),
    ("clinical_knowledge", "health"),
    ("college_biology", "biology"),
    ("college_chemistry", "chemistry"),
    ("college_computer_science", "computer science"),
    ("college_mathematics", "math"),
    ("college_medicine", "health"),
    ("college_physics", "physics"),
    ("computer_security", "computer science"),
    ("conceptual_physics", "physics"),
    ("econometrics", "economics"),
    ("electrical_engineering", "engineering"),
    ("elementary_mathematics", "math"),
    ("formal_logic", "philosophy"),
    ("global_facts", "other"),
    ("high_school_biology", "biology"),
    ("high_school_chemistry", "chemistry"),
    ("high_school_computer_science", "computer science"),
    ("high_school_european_history", "history"),
    ("high_school_geography", "geography"),
    ("high_school_government_and_politics", "politics"),
    ("high_school_macroeconomics", "economics"),
    ("high_school_mathematics", "math"),
    ("high_school_microeconomics", "economics"),
    ("high_school_physics", "physics"),
    ("high_school_psychology", "psychology"),
    ("high_school_statistics", "math"),
    ("high_school_us_history", "history"),
    ("high_school_world_history", "history"),
    ("human_aging", "health"),
    ("human_sexuality", "culture"),
    ("international_law", "law"),
    ("jurisprudence", "law"),
    ("logical_fallacies", "philosophy"),
    ("machine_learning", "computer science"),
    ("management", "business"),
    ("marketing", "business"),
    ("medical_genetics", "health"),
    ("miscellaneous", "other"),
    ("moral_disputes", "philosophy"),
    ("moral_scenarios", "philosophy"),
    ("nutrition", "health"),
    ("philosophy", "philosophy"),
    ("prehistory", "history"),
    ("professional_accounting", "other"),
    ("professional_law", "law"),
    ("professional_medicine", "health"),
    ("professional_psychology", "psychology"),
    ("public_relations", "politics"),
    ("security_studies", "politics"),
    ("sociology", "culture"),
    ("us_foreign_policy", "politics"),
    ("virology", "health"),
    ("world_religions", "philosophy"),
];

/// Category → subcategories, as mmlu.py's `get_categories()` (names printed verbatim).
pub const CATEGORIES: [(&str, &[&str]); 4] = [
    (
        "STEM",
        &[
            "physics",
            "chemistry",
            "biology",
            "computer science",
            "math",
            "engineering",
        ],
    ),
    ("humanities", &["history", "philosophy", "law"]),
    (
        "social sciences",
        &[
            "politics",
            "culture",
            "economics",
            "geography",
            "psychology",
        ],
    ),
    (
        "other (business, health, misc.)",
        &["other", "business", "health"],
    ),
];

pub fn subcategory_of(subject: &str) -> Option<&'static str> {
    SUBCATEGORIES
        .iter()
        .find(|(s, _)| *s == subject)
        .map(|(_, c)| *c)
}

/// Subcategories in first-appearance order (mmlu.py's dict comprehension order).
pub fn subcategory_order() -> Vec<&'static str> {
    let mut out: Vec<&str> = Vec::new();
    for (_, c) in SUBCATEGORIES {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    pub question: String,
    pub options: [String; 4],
    /// Index of the right answer in CHOICES.
    pub answer: usize,
    /// 1-based line where the record starts in its CSV file.
    pub line: u64,
}

/// Reads a hendrycks CSV (no header; question, A, B, C, D, answer letter).
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let bytes = std::fs::read(path).map_err(|e| EvalError::io(path, e))?;
    let lines = LineIndex::new(&bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true) // we check the field count ourselves, with a clearer message
        .from_reader(&bytes[..]);
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| csv_error(path, &lines, e))?;
        let line = lines.line_of_record(rec.position());
        if rec.len() != 6 {
            return Err(EvalError::data(
                path,
                line,
                format!(
                    "expected 6 fields (question, A, B, C, D, answer), found {} — {} options",
                    rec.len(),
                    rec.len().saturating_sub(2)
                ),
            ));
        }
        let letter = rec[5].trim();
        let answer = CHOICES.iter().position(|c| *c == letter).ok_or_else(|| {
            EvalError::data(
                path,
                line,
                format!("answer must be one of A, B, C, D, found {:?}", &rec[5]),
            )
        })?;
        out.push(Question {
            question: rec[0].to_string(),
            options: [
                rec[1].to_string(),
                rec[2].to_string(),
                rec[3].to_string(),
                rec[4].to_string(),
            ],
            answer,
            line,
        });
    }
    if out.is_empty() {
        return Err(EvalError::file(path, "the file has no questions (empty)"));
    }
    Ok(out)
}

/// mmlu.py's `format_subject`: "abstract_algebra" → " abstract algebra" (leading space kept,
/// hence "about  abstract algebra." with two spaces, as in the original).
pub fn format_subject(subject: &str) -> String {
    subject.split('_').map(|w| format!(" {w}")).collect()
}

/// mmlu.py's `format_example`.
pub fn format_example(q: &Question, include_answer: bool) -> String {
    let mut p = q.question.clone();
    for (c, o) in CHOICES.iter().zip(&q.options) {
        p += &format!("\n{c}. {o}");
    }
    p += "\nAnswer:";
    if include_answer {
        p += &format!(" {}\n\n", CHOICES[q.answer]);
    }
    p
}

/// mmlu.py's `gen_prompt` with k examples.
pub fn gen_prompt(train: &[Question], subject: &str, k: usize) -> String {
    let mut p = format!(
        "The following are multiple choice questions (with answers) about {}.\n\n",
        format_subject(subject)
    );
    for q in train.iter().take(k) {
        p += &format_example(q, true);
    }
    p
}

/// One subject's files.
#[derive(Clone, Debug)]
pub struct Subject {
    pub name: String,
    pub dev_path: PathBuf,
    pub test_path: PathBuf,
    pub dev: Vec<Question>,
    pub test: Vec<Question>,
}

/// Loads `dir/test/*_test.csv` (sorted by subject, like mmlu.py) with `dir/dev/<s>_dev.csv`.
pub fn load(
    dir: &Path,
    only: Option<&[String]>,
    ntrain: usize,
    max_questions: Option<usize>,
) -> Result<Vec<Subject>> {
    let test_dir = dir.join("test");
    let rd = std::fs::read_dir(&test_dir).map_err(|e| EvalError::io(&test_dir, e))?;
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(|e| EvalError::io(&test_dir, e))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(s) = n.strip_suffix("_test.csv") {
            names.push(s.to_string());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(EvalError::file(&test_dir, "no <subject>_test.csv files"));
    }
    if let Some(only) = only {
        for s in only {
            if !names.contains(s) {
                return Err(EvalError::Usage(format!(
                    "--subjects: no {}/{s}_test.csv (subjects there: {})",
                    test_dir.display(),
                    names.join(", ")
                )));
            }
        }
        names.retain(|n| only.contains(n));
    }
    let mut out = Vec::new();
    for name in names {
        if subcategory_of(&name).is_none() {
            return Err(EvalError::Usage(format!(
                "subject {name:?} is not one of the 57 MMLU subjects, so it has no category"
            )));
        }
        let dev_path = dir.join("dev").join(format!("{name}_dev.csv"));
        let test_path = test_dir.join(format!("{name}_test.csv"));
        let mut dev = if ntrain > 0 {
            read_questions(&dev_path)?
        } else {
            Vec::new()
        };
        dev.truncate(ntrain);
        let mut test = read_questions(&test_path)?;
        if let Some(m) = max_questions {
            test.truncate(m);
        }
        out.push(Subject {
            name,
            dev_path,
            test_path,
            dev,
            test,
        });
    }
    Ok(out)
}

/// What the data directory's README says about its dev split, when it says it is made of test
/// questions (as ../shared/data/mmlu's does): accuracy is then not the published figure.
pub fn dev_split_note(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("README.md")).ok()?;
    let lower = text.to_lowercase();
    (lower.contains("dev/") && lower.contains("test questions")).then(|| {
        format!(
            "note: {} says its dev/ split is made of test questions: few-shot accuracy on it is close to, but not the same as, published MMLU figures",
            dir.join("README.md").display()
        )
    })
}

#[derive(Clone, Debug)]
pub struct MmluConfig {
    /// Few-shot examples (fewer when the prompt would not fit the context, like mmlu.py).
    pub ntrain: usize,
    /// Questions in flight (each sends its four candidate requests together).
    pub concurrency: usize,
}

/// One scored question.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuestionResult {
    pub subject: String,
    /// 0-based index in the subject's test file.
    pub index: usize,
    pub line: u64,
    pub answer: String,
    pub prediction: String,
    pub correct: bool,
    /// Log-probability of each candidate continuation (" A".." D") after the prompt.
    pub logprobs: [f64; 4],
    /// Few-shot examples actually used.
    pub shots: usize,
    pub prompt_tokens: usize,
    /// Prompt tokens of the four candidate requests together, and how many of them the router
    /// took from its prefix cache.
    #[serde(default)]
    pub sent_prompt_tokens: usize,
    #[serde(default)]
    pub cached_prompt_tokens: usize,
}

/// Index of the largest value; the first one on ties (numpy's argmax).
pub fn argmax(x: &[f64; 4]) -> usize {
    let mut best = 0;
    for i in 1..4 {
        if x[i] > x[best] {
            best = i;
        }
    }
    best
}

/// Scores every test question of every subject.
pub async fn run(
    client: &Client,
    subjects: &[Subject],
    cfg: &MmluConfig,
    progress: Progress,
) -> Result<Vec<QuestionResult>> {
    if cfg.concurrency == 0 {
        return Err(EvalError::Usage("--concurrency must be at least 1".into()));
    }
    let info = client.model_info().await?;
    let ctx = info.max_context_tokens as usize;
    let sem = Arc::new(Semaphore::new(cfg.concurrency));
    let mut set = JoinSet::new();
    let mut out = Vec::new();
    for s in subjects {
        let dev = Arc::new(s.dev.clone());
        for (index, q) in s.test.iter().enumerate() {
            let permit = sem
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| EvalError::Protocol(e.to_string()))?;
            let (client, progress, dev) = (client.clone(), progress.clone(), dev.clone());
            let (q, name, path) = (q.clone(), s.name.clone(), s.test_path.clone());
            let ntrain = cfg.ntrain.min(dev.len());
            set.spawn(async move {
                let _permit = permit;
                let r = score_question(&client, &dev, &name, &path, index, &q, ntrain, ctx).await;
                progress(1);
                r
            });
            while let Some(done) = set.try_join_next() {
                out.push(done.map_err(|e| EvalError::Protocol(e.to_string()))??);
            }
        }
    }
    while let Some(done) = set.join_next().await {
        out.push(done.map_err(|e| EvalError::Protocol(e.to_string()))??);
    }
    let order: BTreeMap<&str, usize> = subjects
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    out.sort_by_key(|r| (order.get(r.subject.as_str()).copied(), r.index));
    Ok(out)
}

/// Token ids of the prompt and of prompt + each candidate, with the fewest few-shot examples
/// dropped so that every candidate sequence (+1 generated token) fits the context.
async fn fit_prompt(
    client: &Client,
    dev: &[Question],
    subject: &str,
    q: &Question,
    mut k: usize,
    ctx: usize,
) -> Result<Option<(usize, Vec<u32>, Vec<Vec<u32>>)>> {
    let end = format_example(q, false);
    loop {
        let prompt = gen_prompt(dev, subject, k) + &end;
        let base = client.tokenize(&prompt, true).await?;
        let mut whole = Vec::with_capacity(4);
        for c in CHOICES {
            whole.push(client.tokenize(&format!("{prompt} {c}"), true).await?);
        }
        // The request generates one token (max_new_tokens 0 is invalid), so +1.
        if whole.iter().all(|w| w.len() < ctx) {
            return Ok(Some((k, base, whole)));
        }
        if k == 0 {
            return Ok(None);
        }
        k -= 1;
    }
}

#[allow(clippy::too_many_arguments)]
async fn score_question(
    client: &Client,
    dev: &[Question],
    subject: &str,
    path: &Path,
    index: usize,
    q: &Question,
    ntrain: usize,
    ctx: usize,
) -> Result<QuestionResult> {
    let (shots, base, whole) = fit_prompt(client, dev, subject, q, ntrain, ctx)
        .await?
        .ok_or_else(|| {
            EvalError::data(
                path,
                q.line,
                format!("the question alone does not fit the model's {ctx}-token context"),
            )
        })?;
    // Score what the candidate adds: the tokens after the longest common prefix of the prompt's
    // and the prompt+candidate's tokenizations. With a byte-level BPE " A" is usually one token
    // appended to the prompt's tokens; if a merge crossed the boundary, the scored span starts
    // earlier, and the comparison is still between full tokenizations of each candidate text.
    let mut futs = Vec::with_capacity(4);
    let sent_prompt_tokens = whole.iter().map(Vec::len).sum();
    for w in whole {
        let p = base.iter().zip(&w).take_while(|(a, b)| a == b).count();
        if p == w.len() || p == 0 {
            return Err(EvalError::Protocol(format!(
                "tokenizing prompt + candidate gave no scorable candidate tokens ({} common of {})",
                p,
                w.len()
            )));
        }
        let client = client.clone();
        futs.push(async move {
            let n = w.len();
            let mut req = greedy_request(w.clone(), 1);
            req.prompt_logprobs = Some(0);
            // Only positions p.. are scored: the rest may come from the prefix cache.
            req.prompt_logprobs_skip_tokens = p as u32;
            let r = client.generate(req).await?;
            // The proto documents one entry per prompt token (the first without a logprob);
            // the router sends entries for tokens 1.. only. Accept both, and check every
            // scored entry's token id so a misalignment cannot go unnoticed.
            let skip = match r.prompt_logprobs.len() {
                l if l == n => 0,
                l if l + 1 == n => 1,
                l => {
                    return Err(EvalError::Protocol(format!(
                        "{l} prompt logprobs for {n} prompt tokens"
                    )));
                }
            };
            let mut sum = 0f64;
            for (t, &tok) in w.iter().enumerate().skip(p) {
                let lp = &r.prompt_logprobs[t - skip];
                if lp.token_id != tok {
                    return Err(EvalError::Protocol(format!(
                        "prompt logprob entry for position {t} is token {} but the prompt has {tok}",
                        lp.token_id
                    )));
                }
                sum += lp.logprob.ok_or_else(|| {
                    EvalError::Protocol(format!("no logprob for prompt token {t}"))
                })? as f64;
            }
            Ok::<(f64, usize), EvalError>((sum, r.cached_prompt_tokens as usize))
        });
    }
    let mut it = futs.into_iter();
    let (a, b, c, d) = match (it.next(), it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
        _ => return Err(EvalError::Protocol("four candidates expected".into())),
    };
    let (a, b, c, d) = tokio::try_join!(a, b, c, d)?;
    let logprobs = [a.0, b.0, c.0, d.0];
    let cached_prompt_tokens = a.1 + b.1 + c.1 + d.1;
    let pred = argmax(&logprobs);
    Ok(QuestionResult {
        subject: subject.to_string(),
        index,
        line: q.line,
        answer: CHOICES[q.answer].to_string(),
        prediction: CHOICES[pred].to_string(),
        correct: pred == q.answer,
        logprobs,
        shots,
        prompt_tokens: base.len(),
        sent_prompt_tokens,
        cached_prompt_tokens,
    })
}

/// Correct and total counts of a group.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Group {
    pub name: String,
    pub correct: usize,
    pub total: usize,
    /// correct / total (a fraction, not a percentage).
    pub accuracy: f64,
}

impl Group {
    fn new(name: &str, correct: usize, total: usize) -> Group {
        Group {
            name: name.to_string(),
            correct,
            total,
            accuracy: correct as f64 / total as f64,
        }
    }
}

/// Accuracy per subject, subcategory, category and overall.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub subjects: Vec<Group>,
    pub subcategories: Vec<Group>,
    pub categories: Vec<Group>,
    pub overall: Group,
}

/// Groups results; subjects in `subject_order`, empty subcategories/categories left out (the
/// seed would fail on them: it only ever runs all 57 subjects).
pub fn summarize(results: &[QuestionResult], subject_order: &[String]) -> Summary {
    let count = |f: &dyn Fn(&QuestionResult) -> bool| {
        let sel: Vec<_> = results.iter().filter(|r| f(r)).collect();
        (sel.iter().filter(|r| r.correct).count(), sel.len())
    };
    let subjects = subject_order
        .iter()
        .map(|s| {
            let (c, n) = count(&|r| &r.subject == s);
            Group::new(s, c, n)
        })
        .collect();
    let subcat_of = |r: &QuestionResult| subcategory_of(&r.subject).unwrap_or("");
    let subcategories = subcategory_order()
        .into_iter()
        .filter_map(|sc| {
            let (c, n) = count(&|r| subcat_of(r) == sc);
            (n > 0).then(|| Group::new(sc, c, n))
        })
        .collect();
    let categories = CATEGORIES
        .iter()
        .filter_map(|(cat, subs)| {
            let (c, n) = count(&|r| subs.contains(&subcat_of(r)));
            (n > 0).then(|| Group::new(cat, c, n))
        })
        .collect();
    let (c, n) = count(&|_| true);
    Summary {
        subjects,
        subcategories,
        categories,
        overall: Group::new("MMLU", c, n),
    }
}

/// The seed's printout: per subject `Average accuracy 0.xxx - subject` (a fraction, 3 places),
/// per subcategory and category `Average accuracy xx.xx - name` (a percentage, 2 places), then
/// `MMLU weighted average accuracy: xx.xx`.
pub fn format_summary(s: &Summary) -> String {
    let mut out = String::new();
    for g in &s.subjects {
        out += &format!("Average accuracy {:.3} - {}\n", g.accuracy, g.name);
    }
    for g in s.subcategories.iter().chain(&s.categories) {
        out += &format!("Average accuracy {:.2} - {}\n", g.accuracy * 100.0, g.name);
    }
    out += &format!(
        "MMLU weighted average accuracy: {:.2}\n",
        s.overall.accuracy * 100.0
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str, ans: usize) -> Question {
        Question {
            question: text.into(),
            options: ["1".into(), "2".into(), "3".into(), "4".into()],
            answer: ans,
            line: 1,
        }
    }

    #[test]
    fn prompt_format_matches_hendrycks() {
        let p = gen_prompt(&[q("1+1?", 1)], "high_school_mathematics", 5)
            + &format_example(&q("2+2?", 3), false);
        assert_eq!(
            p,
            "The following are multiple choice questions (with answers) about  high school mathematics.\n\n\
             1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n\
             2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
        );
    }

    #[test]
    fn mapping_is_complete() {
        assert_eq!(SUBCATEGORIES.len(), 57);
        let subcats = subcategory_order();
        assert_eq!(subcats.len(), 17);
        for sc in &subcats {
            let n = CATEGORIES.iter().filter(|(_, s)| s.contains(sc)).count();
            assert_eq!(n, 1, "{sc} must be in exactly one category");
        }
        assert_eq!(&subcats[..3], &["math", "health", "physics"]);
    }

    #[test]
    fn dev_split_note_follows_the_readme() {
        let d = tempfile::tempdir().unwrap();
        assert!(dev_split_note(d.path()).is_none());
        std::fs::write(
            d.path().join("README.md"),
            "dev/ holds the FIRST FIVE test questions",
        )
        .unwrap();
        assert!(
            dev_split_note(d.path())
                .unwrap()
                .contains("made of test questions")
        );
        std::fs::write(d.path().join("README.md"), "the original dev/ split").unwrap();
        assert!(dev_split_note(d.path()).is_none());
    }

    #[test]
    fn argmax_takes_first_on_ties() {
        assert_eq!(argmax(&[-1.0, -0.5, -0.5, -2.0]), 1);
        assert_eq!(argmax(&[-1.0, -1.0, -1.0, -1.0]), 0);
    }

    #[test]
    fn summary_groups_and_formats() {
        let r = |s: &str, correct| QuestionResult {
            subject: s.into(),
            index: 0,
            line: 1,
            answer: "A".into(),
            prediction: if correct { "A" } else { "B" }.into(),
            correct,
            logprobs: [0.0; 4],
            shots: 0,
            prompt_tokens: 1,
            sent_prompt_tokens: 4,
            cached_prompt_tokens: 0,
        };
        let res = vec![
            r("anatomy", true),
            r("anatomy", false),
            r("astronomy", true),
            r("college_physics", false),
        ];
        let order: Vec<String> = ["anatomy", "astronomy", "college_physics"]
            .map(String::from)
            .to_vec();
        let s = summarize(&res, &order);
        let text = format_summary(&s);
        assert_eq!(
            text,
            "Average accuracy 0.500 - anatomy\n\
             Average accuracy 1.000 - astronomy\n\
             Average accuracy 0.000 - college_physics\n\
             Average accuracy 50.00 - health\n\
             Average accuracy 50.00 - physics\n\
             Average accuracy 50.00 - STEM\n\
             Average accuracy 50.00 - other (business, health, misc.)\n\
             MMLU weighted average accuracy: 50.00\n"
        );
    }
}
