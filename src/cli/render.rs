//! Plain-text rendering for the CLI: the `kiln log` table, the `kiln show` header and timeline,
//! `kiln status`. Colour only when asked (stdout is a terminal and `NO_COLOR` is unset).

use std::io::Write;

use crate::model::Timestamp;
use crate::rollout::state::RolloutState;
use crate::server::api::{EventDto, FleetDto, RolloutDto};

/// ANSI colour for a state.
fn colour(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Succeeded => "\x1b[32m",
        RolloutState::Failed | RolloutState::RolledBack | RolloutState::Aborted => "\x1b[31m",
        RolloutState::Paused | RolloutState::Superseded => "\x1b[33m",
        RolloutState::Skipped => "\x1b[2m",
        _ => "\x1b[36m",
    }
}

/// The state name, padded to `width`, coloured when `color`.
pub fn state(state: RolloutState, width: usize, color: bool) -> String {
    let text = format!("{:<width$}", state.as_str());
    if color { format!("{}{text}\x1b[0m", colour(state)) } else { text }
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
                r.fleet.clone().unwrap_or_else(|| "-".into()),
                short(&r.commit).to_owned(),
                r.image.clone().unwrap_or_else(|| "-".into()),
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
        line.push_str(&rollout.summary);
        if let Some(reason) = &rollout.reason {
            line.push_str(&format!(" ({reason})"));
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
        event.kind,
        event.message.trim_end()
    )
}

/// The `kiln show` header.
pub fn rollout_header(
    out: &mut dyn Write,
    rollout: &RolloutDto,
    now: Timestamp,
    color: bool,
) -> std::io::Result<()> {
    writeln!(out, "rollout #{}  {}", rollout.id, state(rollout.state, 0, color))?;
    writeln!(out, "fleet:     {}", rollout.fleet.as_deref().unwrap_or("-"))?;
    writeln!(out, "commit:    {}  {}", rollout.commit, rollout.summary)?;
    writeln!(out, "trigger:   {} ({})", rollout.trigger, rollout.origin)?;
    writeln!(out, "image:     {}", rollout.image.as_deref().unwrap_or("-"))?;
    if let Some(previous) = &rollout.previous_image {
        writeln!(out, "previous:  {previous}")?;
    }
    for (stage, image) in &rollout.stage_images {
        writeln!(out, "  stage {stage}: {image}")?;
    }
    let plan = &rollout.plan;
    writeln!(
        out,
        "plan:      bake [{}] reconcile={} roll={}{}",
        plan.bake.join(", "),
        plan.reconcile,
        plan.roll,
        if plan.reason.is_empty() { String::new() } else { format!(" ({})", plan.reason) }
    )?;
    for (key, value) in &rollout.outputs {
        writeln!(out, "  output {key}={value}")?;
    }
    if let Some(progress) = rollout.progress {
        writeln!(out, "progress:  {}/{} instances replaced", progress.replaced, progress.total)?;
    }
    writeln!(
        out,
        "created:   {} ({})",
        rollout.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
        age(rollout.created_at, now)
    )?;
    writeln!(out, "took:      {}", took(rollout, now))?;
    if let Some(reason) = &rollout.reason {
        writeln!(out, "reason:    {reason}")?;
    }
    Ok(())
}

/// A one-line progress bar (`[#####-----] 2/4 replaced`).
pub fn progress_bar(replaced: usize, total: usize) -> String {
    const WIDTH: usize = 30;
    let filled =
        (replaced.saturating_mul(WIDTH)).checked_div(total).map_or(WIDTH, |f| f.min(WIDTH));
    format!(
        "[{}{}] {replaced}/{total} instances replaced",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled)
    )
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
            fleet.name, fleet.provider, fleet.capacity
        )?;
        writeln!(
            out,
            "  runs:      {} {}",
            fleet.revision.as_deref().map_or("-", short),
            fleet.image.as_deref().unwrap_or("-")
        )?;
        writeln!(out, "  endpoint:  {}", fleet.endpoint.as_deref().unwrap_or("-"))?;
        match (fleet.active_rollout, fleet.active_state) {
            (Some(id), Some(s)) => writeln!(out, "  rollout:   #{id} {}", state(s, 0, color))?,
            (Some(id), None) => writeln!(out, "  rollout:   #{id}")?,
            _ => writeln!(out, "  rollout:   none in progress")?,
        }
        if !live {
            writeln!(out, "  instances: unknown (no daemon running)")?;
            continue;
        }
        if fleet.instances.is_empty() {
            writeln!(out, "  instances: none")?;
            continue;
        }
        let idw = fleet.instances.iter().map(|i| i.id.len()).max().unwrap_or(2).max(2);
        let imw = fleet.instances.iter().map(|i| i.image.len()).max().unwrap_or(5).max(5);
        let adw = fleet
            .instances
            .iter()
            .map(|i| i.address.as_deref().unwrap_or("-").len())
            .max()
            .unwrap_or(7)
            .max(7);
        writeln!(
            out,
            "  {:<idw$}  {:<imw$}  {:<adw$}  RUNNING  HEALTH     ATTACHED",
            "ID", "IMAGE", "ADDRESS"
        )?;
        for instance in &fleet.instances {
            let health = match instance.healthy {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "unknown",
            };
            writeln!(
                out,
                "  {:<idw$}  {:<imw$}  {:<adw$}  {:<7}  {:<9}  {}",
                instance.id,
                instance.image,
                instance.address.as_deref().unwrap_or("-"),
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
    fn plain(text: &str) -> String {
        text.chars()
            .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
            .collect()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_human_wrote_them() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(200), "3m20s");
        assert_eq!(duration(7500), "2h05m");
        assert_eq!(duration(-3), "0s");
        assert_eq!(progress_bar(1, 2).matches('#').count(), 15);
    }
}
