//! Fuzzing on stable Rust: a seeded mutator over the seed corpora in `fuzz/corpus/<target>/`
//! feeds the manifest parser and each webhook payload parser for a bounded time
//! (`KILN_FUZZ_SECS` per target, default 3) and asserts that every input gets an answer, `Ok`
//! or an error, without a panic and without memory growing past a bound.
//!
//! A failure prints the seed and the iteration and writes the input to
//! `target/fuzz-failures/<target>-<seed>-<iteration>`; `KILN_FUZZ_SEED=<seed>` replays the run.
//! See fuzz/README.md.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::server::webhooks::{Forge, parse_push, repo_matches};

/// Inputs are kept under this size (a real manifest is a few KiB, a push payload tens of KiB).
const MAX_INPUT: usize = 256 * 1024;

/// How much the process's resident memory may grow while one target runs. A parser that
/// expands its input (YAML aliases, say) by orders of magnitude crosses it; normal work,
/// including the other targets running in parallel, stays far below.
const MAX_RSS_GROWTH: u64 = 768 * 1024 * 1024;

/// Tokens of the syntaxes involved, inserted whole so mutations reach deeper than bit noise.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\n",
    b"\n  - ",
    b"  ",
    b"- ",
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!str ",
    b"!!binary ",
    b"---\n",
    b"...\n",
    b"? ",
    b"|\n",
    b">-\n",
    b"#",
    b"%",
    b"+",
    b"=",
    b"&",
    b"payload=",
    b"%7B",
    b"%22",
    b"\\u0000",
    b"\\ud800",
    b"1e999999",
    b"-0",
    b"null",
    b"true",
    b"18446744073709551616",
    b"\xff\xfe",
    b"\x00",
    b"refs/heads/main",
    b"0000000000000000000000000000000000000000",
    b"git@host:a/b.git",
    b"https://u:p@h/x.git",
    b"fleets:",
    b"name: ",
    b"stages:",
    b"from: ",
    b"capacity: ",
    b"maxSurge: ",
    b"150%",
    b"timeout: ",
    b"99999999999d",
    b"http: ",
    b"port: ",
    b"path: ",
    b"../",
    b"/",
];

fn secs() -> u64 {
    std::env::var("KILN_FUZZ_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn seed() -> u64 {
    match std::env::var("KILN_FUZZ_SEED").ok().and_then(|v| v.parse().ok()) {
        Some(seed) => seed,
        None => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(0, |d| d.as_nanos() as u64) ^ u64::from(std::process::id())
        }
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    let corpus: Vec<Vec<u8>> =
        files.iter().map(|path| std::fs::read(path).expect("corpus file")).collect();
    assert!(!corpus.is_empty(), "no seeds in {}", dir.display());
    corpus
}

/// One mutation of `input`: a few edits drawn from bit flips, inserted random bytes or
/// syntax tokens, deletions, splices from another corpus entry, truncation and duplication.
fn mutate(rng: &mut fastrand::Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..rng.usize(1..=8) {
        let at = rng.usize(0..=data.len());
        match rng.u8(0..8) {
            0 if !data.is_empty() => {
                let i = rng.usize(0..data.len());
                data[i] ^= 1 << rng.u8(0..8);
            }
            1 => {
                let bytes: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(..)).collect();
                data.splice(at..at, bytes);
            }
            2 => {
                let token = TOKENS[rng.usize(0..TOKENS.len())];
                data.splice(at..at, token.iter().copied());
            }
            3 if !data.is_empty() => {
                let end = (at + rng.usize(1..64)).min(data.len());
                data.drain(at.min(end)..end);
            }
            4 => {
                let other = &corpus[rng.usize(0..corpus.len())];
                if !other.is_empty() {
                    let from = rng.usize(0..other.len());
                    let to = (from + rng.usize(1..512)).min(other.len());
                    let end = (at + rng.usize(0..512)).min(data.len());
                    data.splice(at..end, other[from..to].iter().copied());
                }
            }
            5 => data.truncate(at),
            6 if !data.is_empty() => {
                let from = rng.usize(0..data.len());
                let to = (from + rng.usize(1..256)).min(data.len());
                let copy = data[from..to].to_vec();
                for _ in 0..rng.usize(1..8) {
                    data.splice(at..at, copy.iter().copied());
                }
            }
            _ => {
                // A byte that matters to the syntaxes: a quote, a brace, a newline, a space.
                let byte = *b"\"{}[]:,\n -&*%=\\".get(rng.usize(0..15)).unwrap_or(&b' ');
                data.insert(at, byte);
            }
        }
    }
    data.truncate(MAX_INPUT);
    data
}

/// Resident memory of this process in bytes (Linux), 0 where unknown.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn save_failure(target: &str, seed: u64, iteration: u64, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{seed}-{iteration}"));
    let _ = std::fs::write(&path, input);
    path
}

/// Runs `check` on every seed, then on mutations of them until the time budget is spent.
fn fuzz(target: &str, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let corpus = corpus(target);
    let seed = seed();
    let budget = Duration::from_secs(secs());
    let mut rng = fastrand::Rng::with_seed(seed);
    let baseline = rss();
    let started = Instant::now();
    let mut iteration = 0u64;
    let mut queue: Vec<Vec<u8>> = corpus.clone();
    loop {
        let input = if (iteration as usize) < corpus.len() {
            corpus[iteration as usize].clone()
        } else {
            let parent = &queue[rng.usize(0..queue.len())];
            mutate(&mut rng, parent, &corpus)
        };
        let outcome = std::panic::catch_unwind(|| check(&input));
        let grown = rss().saturating_sub(baseline);
        if outcome.is_err() || grown > MAX_RSS_GROWTH {
            let path = save_failure(target, seed, iteration, &input);
            panic!(
                "fuzz target `{target}` failed at iteration {iteration} ({}): rerun with \
                 KILN_FUZZ_SEED={seed}; input ({} bytes) saved to {}",
                if outcome.is_err() {
                    "panic".to_owned()
                } else {
                    format!("resident memory grew by {} MiB", grown >> 20)
                },
                input.len(),
                path.display()
            );
        }
        // Keep some mutants as parents so edits accumulate, bounded so memory stays flat.
        if iteration as usize >= corpus.len() && rng.u8(0..16) == 0 {
            if queue.len() < 256 {
                queue.push(input);
            } else {
                let slot = rng.usize(corpus.len()..queue.len());
                queue[slot] = input;
            }
        }
        iteration += 1;
        if started.elapsed() >= budget && iteration as usize >= corpus.len() {
            break;
        }
    }
    eprintln!("fuzz {target}: {iteration} inputs in {:?} (seed {seed})", started.elapsed());
}

/// What the daemon does with a parsed payload: compare its URLs and names with a watched
/// repository. Exercised too, since it parses the URLs the payload carries.
fn use_hint(hint: &kiln::server::webhooks::PushHint) {
    for watched in ["https://git.example.com/team/infra.git", "/srv/git/infra.git"] {
        let _ = hint.matches_repo(watched);
        let _ = repo_matches(watched, &hint.urls, &hint.names);
    }
    for url in &hint.urls {
        let _ = kiln::server::webhooks::normalize_url(url);
        let _ = kiln::error::redact(url);
    }
}

fn webhook(target: &str, forge: Forge, content_type: &'static str) {
    fuzz(target, move |body| {
        if let Ok(hint) = parse_push(forge, Some(content_type), body) {
            use_hint(&hint);
        }
    });
}

#[test]
fn manifest() {
    fuzz("manifest", |bytes| {
        let text = String::from_utf8_lossy(bytes);
        match kiln::manifest::parse(&text, "kiln.yaml") {
            Ok(manifest) => {
                let _ = kiln::manifest::to_json(&manifest);
            }
            Err(error) => {
                assert!(!error.problems.is_empty(), "an error names at least one problem");
                let _ = error.to_string();
            }
        }
    });
}

#[test]
fn gitlab() {
    webhook("gitlab", Forge::GitLab, "application/json");
}

#[test]
fn github() {
    webhook("github", Forge::GitHub, "application/json");
}

#[test]
fn github_form() {
    webhook("github-form", Forge::GitHub, "application/x-www-form-urlencoded");
}

#[test]
fn gitea() {
    webhook("gitea", Forge::Gitea, "application/json");
}

#[test]
fn generic() {
    webhook("generic", Forge::Generic, "application/json");
}

#[test]
fn the_mutator_is_deterministic_per_seed() {
    let corpus = corpus("gitlab");
    let run = |seed| {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..50).map(|_| mutate(&mut rng, &corpus[0], &corpus)).collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7), "a printed seed must replay the same inputs");
    assert_ne!(run(7), run(8));
}
