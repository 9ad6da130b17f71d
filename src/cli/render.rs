//! Plain-text rendering for the CLI: the `kiln log` table, the `kiln show` header and timeline,
//! `kiln status`. Colour only when asked (stdout is a terminal and `NO_COLOR` is unset).
//!
//! Every text that comes from outside kiln (commit messages, hook output, names from the
//! manifest, images, addresses) goes through [`escape_control`] here, so a commit message
//! cannot clear the screen or retitle the terminal. This text output is for people; `--json`
//! prints the values exactly.

use std::borrow::Cow;
use std::io::Write;

use crate::model::Timestamp;
use crate::rollout::state::RolloutState;
use crate::server::api::{DriftDto, EventDto, FleetDto, RolloutDto};

/// Shows control characters visibly instead of letting the terminal act on them: C0 controls
/// (ESC, BEL, CR, backspace, ...), DEL and C1 controls (U+0080..U+009F, among them the
/// 8-bit CSI) become `\x1b`-style escapes, and a backslash stays as it is. Newlines and tabs
/// are kept when `keep_lines` (multi-line messages), escaped otherwise (one table cell).
pub fn escape_control(text: &str, keep_lines: bool) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() && !(keep_lines && (c == '\n' || c == '\t'));
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// One line's worth of outside text, escaped (see [`escape_control`]).
fn clean(text: &str) -> Cow<'_, str> {
    escape_control(text, false)
}

/// The style a state is shown in (`anstyle`, the styling types clap itself uses).
fn colour(state: RolloutState) -> anstyle::Style {
    use anstyle::AnsiColor;
    match state {
        RolloutState::Succeeded => AnsiColor::Green.on_default(),
        RolloutState::Failed | RolloutState::RolledBack | RolloutState::Aborted => {
            AnsiColor::Red.on_default()
        }
        RolloutState::Paused | RolloutState::Superseded => AnsiColor::Yellow.on_default(),
        RolloutState::Skipped => anstyle::Style::new().dimmed(),
        _ => AnsiColor::Cyan.on_default(),
    }
}

/// The state name, padded to `width`, coloured when `color`.
pub fn state(state: RolloutState, width: usize, color: bool) -> String {
    let text = format!("{:<width$}", state.as_str());
    if color {
        let style = colour(state);
        format!("{style}{text}{style:#}")
    } else {
        text
    }
}

/// `5s`, `3m20s`, `2h05m`, `4d03h`.
pub fn duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// How long ago `at` was.
pub fn age(at: Timestamp, now: Timestamp) -> String {
    format!("{} ago", duration((now - at).num_seconds()))
}

fn short(commit: &str) -> &str {
    commit.get(..8).unwrap_or(commit)
}

/// How long a rollout took (or has been running).
fn took(rollout: &RolloutDto, now: Timestamp) -> String {
    match (rollout.started_at, rollout.finished_at) {
        (Some(start), Some(end)) => duration((end - start).num_seconds()),
        (Some(start), None) => format!("{}…", duration((now - start).num_seconds())),
        _ => "-".to_owned(),
    }
}

/// The `kiln log` table, newest first.
pub fn log_table(
    out: &mut dyn Write,
    rollouts: &[RolloutDto],
    now: Timestamp,
    color: bool,
) -> std::io::Result<()> {
    let rows: Vec<[String; 7]> = rollouts
        .iter()
        .map(|r| {
            [
                format!("#{}", r.id),
                r.state.as_str().to_owned(),
                clean(r.fleet.as_deref().unwrap_or("-")).into_owned(),
                clean(short(&r.commit)).into_owned(),
                clean(r.image.as_deref().unwrap_or("-")).into_owned(),
                age(r.created_at, now),
                took(r, now),
            ]
        })
        .collect();
    let header = ["ID", "STATE", "FLEET", "COMMIT", "IMAGE", "CREATED", "TOOK"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = String::new();
    for (cell, w) in header.iter().zip(widths) {
        line.push_str(&format!("{cell:<w$}  "));
    }
    writeln!(out, "{line}SUMMARY")?;
    for (row, rollout) in rows.iter().zip(rollouts) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i == 1 {
                line.push_str(&state(rollout.state, w, color));
                line.push_str("  ");
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        line.push_str(&clean(&rollout.summary));
        if let Some(verified) = &rollout.verified {
            line.push_str(&format!(
                " [verified: {} {}]",
                clean(&verified.method),
                clean(&verified.signer)
            ));
        }
        if let Some(reason) = &rollout.reason {
            line.push_str(&format!(" ({})", clean(reason)));
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// One timeline line of `kiln show`.
pub fn event_line(out: &mut dyn Write, event: &EventDto) -> std::io::Result<()> {
    let mark = match event.level.as_str() {
        "error" => "!!",
        "warn" => " !",
        _ => "  ",
    };
    writeln!(
        out,
        "{} {mark} {:<18} {}",
        event.at.format("%H:%M:%S%.3f"),
        clean(&event.kind),
        escape_control(event.message.trim_end(), true)
    )
}

/// One line of `kiln events`: sequence number, rollout, fleet and short commit, then the event
/// as `kiln show` prints it.
pub fn feed_line(out: &mut dyn Write, event: &EventDto) -> std::io::Result<()> {
    let commit = event.commit.as_deref().map_or("-", |c| c.get(..8).unwrap_or(c));
    write!(
        out,
        "{:>7} #{:<5} {:<12} {:<8} ",
        event.seq,
        event.rollout,
        clean(event.fleet.as_deref().unwrap_or("-")),
        clean(commit)
    )?;
    event_line(out, event)
}

/// The `kiln show` header.
pub fn rollout_header(
    out: &mut dyn Write,
    rollout: &RolloutDto,
    now: Timestamp,
    color: bool,
) -> std::io::Result<()> {
    writeln!(out, "rollout #{}  {}", rollout.id, state(rollout.state, 0, color))?;
    writeln!(out, "fleet:     {}", clean(rollout.fleet.as_deref().unwrap_or("-")))?;
    writeln!(out, "commit:    {}  {}", clean(&rollout.commit), clean(&rollout.summary))?;
    writeln!(out, "trigger:   {} ({})", clean(&rollout.trigger), clean(&rollout.origin))?;
    writeln!(out, "image:     {}", clean(rollout.image.as_deref().unwrap_or("-")))?;
    if let Some(previous) = &rollout.previous_image {
        writeln!(out, "previous:  {}", clean(previous))?;
    }
    for (stage, image) in &rollout.stage_images {
        writeln!(out, "  stage {}: {}", clean(stage), clean(image))?;
    }
    let plan = &rollout.plan;
    writeln!(
        out,
        "plan:      bake [{}] reconcile={} roll={}{}",
        clean(&plan.bake.join(", ")),
        plan.reconcile,
        plan.roll,
        if plan.reason.is_empty() { String::new() } else { format!(" ({})", clean(&plan.reason)) }
    )?;
    for (key, value) in &rollout.outputs {
        writeln!(out, "  output {}={}", clean(key), clean(value))?;
    }
    if let Some(progress) = rollout.progress {
        writeln!(out, "progress:  {}", progress_text(progress))?;
    }
    writeln!(
        out,
        "created:   {} ({})",
        rollout.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
        age(rollout.created_at, now)
    )?;
    if let Some(v) = &rollout.verified {
        let scope = match &v.since {
            Some(since) => format!("{} commits since {}", v.commits, clean(short(since))),
            None => "the tip".to_owned(),
        };
        writeln!(
            out,
            "verified:  signed by {} ({} key {}); {} mode, {scope}, trust from {}",
            clean(&v.signer),
            clean(&v.method),
            clean(&v.key),
            clean(&v.mode),
            clean(&v.policy)
        )?;
        if v.signers.len() > 1 {
            for signer in &v.signers {
                writeln!(out, "  signer {}", clean(signer))?;
            }
        }
    }
    writeln!(out, "took:      {}", took(rollout, now))?;
    if let Some(reason) = &rollout.reason {
        writeln!(out, "reason:    {}", escape_control(reason, true))?;
    }
    Ok(())
}

/// How far a rollout's instance work got: old instances replaced, or on a first deployment
/// (nothing to replace) the new instances in service.
pub fn progress_text(progress: crate::server::api::ProgressDto) -> String {
    if progress.total == 0 {
        let n = progress.attached;
        format!("{n} new instance{} in service (first deployment)", if n == 1 { "" } else { "s" })
    } else {
        format!("{}/{} instances replaced", progress.replaced, progress.total)
    }
}

/// The `drift:` line of `kiln status` (and each finding under it).
fn drift_lines(out: &mut dyn Write, drift: Option<&DriftDto>) -> std::io::Result<()> {
    let Some(drift) = drift else {
        return writeln!(out, "  drift:     not checked yet");
    };
    let at = drift.checked_at.format("%Y-%m-%d %H:%M:%S");
    let record = drift.record.map(|id| format!(", see #{id}")).unwrap_or_default();
    let repair = drift.repair.map(|id| format!(", repair #{id}")).unwrap_or_default();
    if drift.findings.is_empty() && drift.errors.is_empty() {
        return writeln!(out, "  drift:     none (checked {at})");
    }
    writeln!(
        out,
        "  drift:     {} finding(s){}, checked {at}{record}{repair}",
        drift.findings.len(),
        if drift.errors.is_empty() {
            String::new()
        } else {
            format!(", {} error(s)", drift.errors.len())
        }
    )?;
    for finding in &drift.findings {
        writeln!(out, "    - {}: {}", clean(&finding.kind), clean(&finding.message))?;
    }
    for error in &drift.errors {
        writeln!(out, "    - check failed: {}", clean(error))?;
    }
    Ok(())
}

/// `kiln drift`: one fleet's report.
pub fn drift_report(out: &mut dyn Write, drift: &DriftDto) -> std::io::Result<()> {
    writeln!(out, "fleet {}", clean(&drift.fleet))?;
    drift_lines(out, Some(drift))
}

/// `kiln status`.
pub fn status(
    out: &mut dyn Write,
    fleets: &[FleetDto],
    live: bool,
    color: bool,
) -> std::io::Result<()> {
    for (i, fleet) in fleets.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(
            out,
            "fleet {}  (provider {}, capacity {})",
            clean(&fleet.name),
            clean(&fleet.provider),
            fleet.capacity
        )?;
        writeln!(
            out,
            "  runs:      {} {}",
            clean(fleet.revision.as_deref().map_or("-", short)),
            clean(fleet.image.as_deref().unwrap_or("-"))
        )?;
        writeln!(out, "  endpoint:  {}", clean(fleet.endpoint.as_deref().unwrap_or("-")))?;
        if fleet.orphaned {
            writeln!(
                out,
                "  ORPHANED:  not in kiln.yaml any more; `kiln down {}` retires it",
                clean(&fleet.name)
            )?;
        }
        match (fleet.active_rollout, fleet.active_state) {
            (Some(id), Some(s)) => writeln!(out, "  rollout:   #{id} {}", state(s, 0, color))?,
            (Some(id), None) => writeln!(out, "  rollout:   #{id}")?,
            _ => writeln!(out, "  rollout:   none in progress")?,
        }
        drift_lines(out, fleet.drift.as_ref())?;
        if !live {
            writeln!(out, "  instances: unknown (no daemon running)")?;
            continue;
        }
        if fleet.instances.is_empty() {
            writeln!(out, "  instances: none")?;
            continue;
        }
        let rows: Vec<[String; 3]> = fleet
            .instances
            .iter()
            .map(|i| {
                [
                    clean(&i.id).into_owned(),
                    clean(&i.image).into_owned(),
                    clean(i.address.as_deref().unwrap_or("-")).into_owned(),
                ]
            })
            .collect();
        let width = |col: usize, min: usize| {
            rows.iter().map(|r| r[col].chars().count()).max().unwrap_or(min).max(min)
        };
        let (idw, imw, adw) = (width(0, 2), width(1, 5), width(2, 7));
        writeln!(
            out,
            "  {:<idw$}  {:<imw$}  {:<adw$}  RUNNING  HEALTH     ATTACHED",
            "ID", "IMAGE", "ADDRESS"
        )?;
        for (instance, [id, image, address]) in fleet.instances.iter().zip(&rows) {
            let health = match instance.healthy {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "unknown",
            };
            writeln!(
                out,
                "  {:<idw$}  {:<imw$}  {:<adw$}  {:<7}  {:<9}  {}",
                id,
                image,
                address,
                if instance.running { "yes" } else { "no" },
                health,
                if instance.attached { "yes" } else { "no" },
            )?;
        }
    }
    Ok(())
}

/// `kiln log --commits`: one line per commit (newest first) with its outcome; the reason of a
/// skipped or failed commit on the line below it. Text from git (summary, author, reasons) has
/// control characters shown escaped, so a commit message cannot drive the terminal.
pub fn commit_table(
    out: &mut dyn Write,
    commits: &[crate::server::api::CommitDto],
    now: Timestamp,
) -> std::io::Result<()> {
    let plain = |text: &str| clean(text).into_owned();
    let rows: Vec<([String; 4], String, Option<String>)> = commits
        .iter()
        .map(|c| {
            let author = c.author.split(" <").next().unwrap_or_default();
            let (outcome, reason) = match &c.outcome {
                Some(o) if o.status == "rollouts" => (
                    o.rollouts
                        .iter()
                        .map(|r| format!("{} #{} {}", r.fleet, r.id, r.state))
                        .collect::<Vec<_>>()
                        .join(", "),
                    None,
                ),
                Some(o) => (o.status.replace('_', " "), o.reason.clone()),
                None => ("-".to_owned(), None),
            };
            let note = match (c.kind.as_str(), &c.overwrote) {
                ("force_push", Some(old)) => format!("[force-push over {}] ", short(old)),
                ("force_push", None) => "[force-push] ".to_owned(),
                ("branch_created", _) => "[branch recreated] ".to_owned(),
                _ => String::new(),
            };
            (
                [
                    short(&c.revision).to_owned(),
                    age(c.committed_at, now),
                    plain(if author.is_empty() { "-" } else { author }),
                    plain(&outcome),
                ],
                format!("{note}{}", plain(&c.summary)),
                reason.map(|r| plain(&r)),
            )
        })
        .collect();
    let header = ["COMMIT", "WHEN", "AUTHOR", "OUTCOME"];
    let mut widths = header.map(str::len);
    for (row, _, _) in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = String::new();
    for (cell, w) in header.iter().zip(widths) {
        line.push_str(&format!("{cell:<w$}  "));
    }
    writeln!(out, "{line}SUMMARY")?;
    let indent = widths[..3].iter().map(|w| w + 2).sum::<usize>();
    for (row, summary, reason) in rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            line.push_str(&format!("{cell:<w$}  "));
        }
        line.push_str(&summary);
        writeln!(out, "{}", line.trim_end())?;
        if let Some(reason) = reason {
            writeln!(out, "{:indent$}{reason}", "")?;
        }
    }
    Ok(())
}

/// The notification outbox under `kiln status`: counts, each sink's backlog and the newest dead
/// letters (nothing when no sink ever had work).
pub fn notifications(
    out: &mut dyn Write,
    outbox: &crate::notify::OutboxStatus,
) -> std::io::Result<()> {
    if outbox.pending == 0 && outbox.dead == 0 && outbox.delivered == 0 {
        return Ok(());
    }
    writeln!(out)?;
    writeln!(
        out,
        "notifications: {} pending, {} dead-lettered, {} delivered",
        outbox.pending, outbox.dead, outbox.delivered
    )?;
    for sink in &outbox.sinks {
        let error = sink
            .last_error
            .as_deref()
            .map(|e| format!(" (attempt {}: {})", sink.attempts, clean(e)))
            .unwrap_or_default();
        writeln!(
            out,
            "  pending  {} ({}): {}{error}",
            clean(&sink.sink),
            clean(&sink.kind),
            sink.pending
        )?;
    }
    for dead in &outbox.dead_letters {
        writeln!(
            out,
            "  DEAD     {} ({}): {} of rollout #{} after {} attempt(s): {}",
            clean(&dead.sink),
            clean(&dead.kind),
            clean(&dead.topic),
            dead.rollout,
            dead.attempts,
            clean(dead.error.as_deref().unwrap_or("-"))
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(escape_control("plain text, ünïcode ✓", false), "plain text, ünïcode ✓");
        assert!(matches!(escape_control("plain", false), Cow::Borrowed(_)));
        // Clear screen, window title (OSC ... BEL), CR overwrite, DEL, 8-bit CSI.
        let hostile = "fix\x1b[2J\x1b]0;pwned\x07 done\rX\x7f\u{9b}31m";
        let shown = escape_control(hostile, false);
        assert_eq!(shown, "fix\\x1b[2J\\x1b]0;pwned\\x07 done\\x0dX\\x7f\\x9b31m");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(escape_control("a\tb\nc", false), "a\\x09b\\x0ac");
        assert_eq!(escape_control("a\tb\nc\x1b", true), "a\tb\nc\\x1b");
    }

    #[test]
    fn a_first_deployment_shows_instances_in_service_not_0_of_0() {
        use crate::server::api::ProgressDto;
        let first = ProgressDto { replaced: 0, total: 0, attached: 2 };
        assert_eq!(progress_text(first), "2 new instances in service (first deployment)");
        let replacing = ProgressDto { replaced: 1, total: 3, attached: 1 };
        assert_eq!(progress_text(replacing), "1/3 instances replaced");
        let mut rollout = hostile_rollout();
        rollout.progress = Some(ProgressDto { replaced: 0, total: 0, attached: 1 });
        let mut out = Vec::new();
        rollout_header(&mut out, &rollout, crate::model::now(), false).expect("render");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(!text.contains("0/0"), "{text}");
        assert!(text.contains("progress:  1 new instance in service"), "{text}");
    }

    fn hostile_rollout() -> RolloutDto {
        let now = crate::model::now();
        RolloutDto {
            id: 7,
            fleet: Some("web".into()),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            summary: "innocent\x1b]0;owned\x07\x1b[2J".into(),
            trigger: "poll".into(),
            origin: "commit".into(),
            state: RolloutState::Failed,
            reason: Some("hook said \x1b[31mred\x1b[0m".into()),
            image: Some("img\u{9b}1".into()),
            previous_image: None,
            stage_images: Default::default(),
            plan: Default::default(),
            outputs: [("k\x1b".to_owned(), "v\x07".to_owned())].into_iter().collect(),
            progress: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            events: None,
            verified: Some(crate::server::api::VerifiedDto {
                mode: "range".into(),
                policy: "kiln.yaml at 01234567".into(),
                since: Some("89abcdef0123456789abcdef0123456789abcdef".into()),
                commits: 3,
                method: "gpg".into(),
                signer: "Eve \x1b[2J<e@x>".into(),
                key: "AAAA".into(),
                signers: vec!["gpg Eve \x1b[2J<e@x> AAAA".into(), "ssh bob@x SHA256:k".into()],
            }),
        }
    }

    #[test]
    fn log_and_show_escape_what_commits_and_hooks_wrote() {
        let now = crate::model::now();
        let rollout = hostile_rollout();
        for color in [true, false] {
            let mut table = Vec::new();
            log_table(&mut table, std::slice::from_ref(&rollout), now, color).expect("render");
            let table = String::from_utf8(table).expect("utf-8");
            assert!(table.contains("innocent\\x1b]0;owned\\x07\\x1b[2J"), "{table}");
            assert!(table.contains("img\\x9b1"), "{table}");
            let mut show = Vec::new();
            rollout_header(&mut show, &rollout, now, color).expect("render");
            let show = String::from_utf8(show).expect("utf-8");
            assert!(show.contains("output k\\x1b=v\\x07"), "{show}");
            assert!(table.contains("[verified: gpg Eve \\x1b[2J<e@x>]"), "{table}");
            assert!(
                show.contains("verified:  signed by Eve \\x1b[2J<e@x> (gpg key AAAA)"),
                "{show}"
            );
            assert!(show.contains("range mode, 3 commits since 89abcdef"), "{show}");
            assert!(show.contains("  signer ssh bob@x SHA256:k"), "{show}");
            for text in [&table, &show] {
                // The only escape sequences left are kiln's own colours.
                let without_colours = text
                    .replace("\x1b[0m", "")
                    .replace(&colour(rollout.state).render().to_string(), "");
                assert!(!without_colours.contains('\x1b'), "{text:?}");
                assert!(!without_colours.contains('\x07') && !without_colours.contains('\u{9b}'));
            }
        }
        let event = EventDto {
            seq: 1,
            rollout: 7,
            fleet: Some("web".into()),
            commit: None,
            change: None,
            at: now,
            level: "info".into(),
            kind: "hook.stdout".into(),
            message: "line one\n\x1b[2Jline two".into(),
            data: None,
        };
        let mut line = Vec::new();
        event_line(&mut line, &event).expect("render");
        let line = String::from_utf8(line).expect("utf-8");
        assert!(line.contains("line one\n\\x1b[2Jline two"), "{line}");
    }

    #[test]
    fn durations_read_like_a_human_wrote_them() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(200), "3m20s");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(duration(-3), "0s");
    }
}
