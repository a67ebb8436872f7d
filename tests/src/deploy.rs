//! What the deployment checks (`tests/tests/deployment.rs`) share: the repository's files, the
//! tools `scripts/lib.sh` installs (`ensure_deploy_tools`: kustomize, checkov,
//! kubernetes-validate), YAML read through the tools' Python (PyYAML, which checkov brings), and
//! the metric names a PromQL expression reads.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_path_buf()
}

/// A program of the deployment tools' virtualenv (`DEPLOY_TOOLS_BIN`, set by `scripts/test`).
pub fn deploy_tool(name: &str) -> PathBuf {
    let bin = std::env::var("DEPLOY_TOOLS_BIN").unwrap_or_else(|_| {
        panic!(
            "DEPLOY_TOOLS_BIN is unset: run the suite with scripts/test, whose \
             ensure_deploy_tools installs checkov and kubernetes-validate (deploy/tools/requirements.txt)"
        )
    });
    let path = Path::new(&bin).join(name);
    assert!(
        path.exists(),
        "{} is missing: scripts/test (ensure_deploy_tools) installs it",
        path.display()
    );
    path
}

/// The kustomize binary (`KUSTOMIZE`, set by `scripts/test`).
pub fn kustomize() -> PathBuf {
    let path = std::env::var("KUSTOMIZE").unwrap_or_else(|_| {
        panic!(
            "KUSTOMIZE is unset: run the suite with scripts/test, whose ensure_deploy_tools \
             builds kustomize from the Go module proxy"
        )
    });
    PathBuf::from(path)
}

/// Runs `command` and returns its output; panics (naming `what`) if it cannot start.
pub fn run(command: &mut Command, what: &str) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({command:?}): {e}"))
}

/// `kustomize build` of `dir` (relative to the repository): the rendered YAML.
pub fn kustomize_build(dir: &str) -> String {
    let output = run(
        Command::new(kustomize()).arg("build").arg(repo().join(dir)),
        "kustomize",
    );
    assert!(
        output.status.success(),
        "kustomize build {dir} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kustomize prints UTF-8")
}

/// Every document of a YAML stream, as JSON values (PyYAML's safe loader; empty documents
/// dropped). `what` names the source in a failure.
pub fn yaml_documents(yaml: &str, what: &str) -> Vec<Value> {
    use std::io::Write;
    let mut child = Command::new(deploy_tool("python"))
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the deployment tools' python starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("YAML written");
    let output = child.wait_with_output().expect("python ends");
    assert!(
        output.status.success(),
        "{what} is not valid YAML:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout).expect("JSON from python") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// A YAML file of the repository (one document).
pub fn yaml_file(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path))
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let mut docs = yaml_documents(&text, path);
    assert_eq!(docs.len(), 1, "{path} holds one YAML document");
    docs.remove(0)
}

/// PromQL's aggregation operators (followed by `by`/`without` or their parenthesised argument).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Keywords followed by a parenthesised label list.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Other keywords and literals that are not metric names.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];

/// The metric names a PromQL expression reads: every bare selector name (not a function,
/// aggregation, keyword, label name in a `{...}` matcher or `by (...)` list, string, duration
/// or number). Histogram series keep their suffix (`x_bucket`): they are matched against the
/// scraped series names as they are.
pub fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_group(&chars, i, '{', '}'),
            '[' => i = skip_group(&chars, i, '[', ']'),
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '.' | '_'))
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let lower = word.to_ascii_lowercase();
                if LABEL_LISTS.contains(&lower.as_str()) {
                    if chars.get(next) == Some(&'(') {
                        i = skip_group(&chars, next, '(', ')');
                    }
                } else if KEYWORDS.contains(&lower.as_str())
                    || AGGREGATIONS.contains(&lower.as_str())
                    || chars.get(next) == Some(&'(')
                {
                    // An operator, a literal, or a function call: not a metric.
                } else {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Past the string starting at `i` (its quote), escapes honoured.
fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() {
        if chars[j] == '\\' && quote != '`' {
            j += 2;
            continue;
        }
        if chars[j] == quote {
            return j + 1;
        }
        j += 1;
    }
    j
}

/// Past the bracketed group starting at `i`, nested groups and strings included.
fn skip_group(chars: &[char], i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j < chars.len() {
        match chars[j] {
            '"' | '\'' | '`' => {
                j = skip_string(chars, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// The metric names a Grafana template query reads: `label_values(metric, label)` reads
/// `metric`; `label_values(label)` reads none; anything else is PromQL.
pub fn template_metric_names(query: &str) -> Vec<String> {
    let query = query.trim();
    if let Some(args) = query
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        return match args.rsplit_once(',') {
            Some((selector, _label)) => metric_names(selector),
            None => Vec::new(),
        };
    }
    metric_names(query)
}

/// The series names of a Prometheus text exposition (`name{labels} value` lines).
pub fn exposed_series(page: &str) -> Vec<String> {
    page.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{exposed_series, metric_names, template_metric_names};

    #[test]
    fn metric_names_are_the_selectors_and_nothing_else() {
        assert_eq!(
            metric_names(
                r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{route!~"/x{y}", status=~"5.."}[5m] offset 1h)))"#
            ),
            vec!["http_request_duration_seconds_bucket"]
        );
        assert_eq!(
            metric_names(
                "max by (projection) (projector_lag_events) > 0 unless sum by (projection) (rate(projector_applied_total[10m])) > 0"
            ),
            vec!["projector_lag_events", "projector_applied_total"]
        );
        assert_eq!(
            metric_names("a / on (job) group_left (x) b_total * 1e3 and bool c:rate5m"),
            vec!["a", "b_total", "c:rate5m"]
        );
        assert_eq!(
            metric_names(r#"sum(rate(x_total{p=~"$projection"}[$__rate_interval]))"#),
            vec!["x_total"]
        );
        assert!(metric_names("vector(1) + time()").is_empty());
    }

    #[test]
    fn template_queries_name_their_metric() {
        assert_eq!(
            template_metric_names("label_values(projector_lag_events, projection)"),
            vec!["projector_lag_events"]
        );
        assert!(template_metric_names("label_values(job)").is_empty());
    }

    #[test]
    fn exposed_series_are_the_sample_names() {
        let page = "# HELP a_total x\n# TYPE a_total counter\na_total{x=\"1\"} 3\nb 1\n\nc_bucket{le=\"1\"} 0\n";
        assert_eq!(exposed_series(page), vec!["a_total", "b", "c_bucket"]);
    }
}
