//! What an event of the feed means to sinks and forges (pure): which [`NotifyEvent`] it is, the
//! readable [`Notice`] sinks are sent, and the commit statuses it moves.

use serde::{Deserialize, Serialize};

use crate::manifest::NotifyEvent;
use crate::model::Timestamp;
use crate::rollout::state::{Origin, Rollout, RolloutState};
use crate::store::{CommitRecord, Event, EventKind};

/// The readable message a sink is sent about one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// What happened.
    pub event: NotifyEvent,
    /// One line: `web: rollout #4 rolled back`.
    pub title: String,
    /// The fleet (`None` for a commit-level record).
    pub fleet: Option<String>,
    /// The rollout.
    pub rollout: u64,
    /// Its state when the event happened.
    pub state: String,
    /// The commit (full id).
    pub commit: String,
    /// Its first 8 characters.
    pub short: String,
    /// Its subject line.
    pub subject: String,
    /// `Name <email>`, when the commit was recorded.
    pub author: Option<String>,
    /// The image the fleet moves to.
    pub image: Option<String>,
    /// The image it ran before.
    pub previous_image: Option<String>,
    /// How long the rollout took so far (`1m 12s`).
    pub duration: Option<String>,
    /// The step that failed (`bake`, `reconcile`, `rolling: health check`).
    pub failed_step: Option<String>,
    /// Why (failure reason, pause reason, drift summary).
    pub reason: Option<String>,
    /// The rollout in the dashboard.
    pub link: String,
    /// When the event happened.
    pub at: Timestamp,
}

impl Notice {
    /// The message as plain text lines (email body, Feishu text, the webhook's `text`).
    pub fn text(&self) -> String {
        let mut out = format!("{}\n", self.title);
        out.push_str(&format!("commit {} {}", self.short, self.subject));
        if let Some(author) = &self.author {
            out.push_str(&format!(" (by {author})"));
        }
        out.push('\n');
        if let Some(step) = &self.failed_step {
            out.push_str(&format!("failed step: {step}\n"));
        }
        if let Some(reason) = &self.reason {
            out.push_str(&format!("reason: {reason}\n"));
        }
        if let Some(image) = &self.image {
            out.push_str(&format!("image: {image}\n"));
        }
        if let Some(previous) = &self.previous_image {
            out.push_str(&format!("previous image: {previous}\n"));
        }
        if let Some(duration) = &self.duration {
            out.push_str(&format!("duration: {duration}\n"));
        }
        out.push_str(&self.link);
        out.push('\n');
        out
    }

    /// The message as Markdown (WeCom, DingTalk, Slack's mrkdwn is close enough for the
    /// detail lines): values in code spans, so nothing in them is taken as markup.
    pub fn markdown(&self, heading: &str) -> String {
        let mut out = format!("{heading}{}\n", self.title);
        out.push_str(&format!("> commit: `{}` {}", self.short, code_free(&self.subject)));
        if let Some(author) = &self.author {
            out.push_str(&format!(" by {}", code_free(author)));
        }
        out.push('\n');
        if let Some(step) = &self.failed_step {
            out.push_str(&format!("> failed step: **{}**\n", code_free(step)));
        }
        if let Some(reason) = &self.reason {
            out.push_str(&format!("> reason: `{}`\n", code_free(reason)));
        }
        if let Some(image) = &self.image {
            out.push_str(&format!("> image: `{}`\n", code_free(image)));
        }
        if let Some(duration) = &self.duration {
            out.push_str(&format!("> duration: {duration}\n"));
        }
        out.push_str(&format!("[rollout #{}]({})\n", self.rollout, self.link));
        out
    }
}

/// `text` without backticks and line breaks (it goes inside a code span or a one-line quote).
fn code_free(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == '`' {
                '\''
            } else if c.is_control() {
                ' '
            } else {
                c
            }
        })
        .collect()
}

/// `1h 2m 3s`.
pub fn human_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m {s}s"),
        _ => format!("{h}h {m}m {s}s"),
    }
}

/// Whether the rollouts of this origin are about their commit (commit statuses are posted for
/// those only; a repair or a rebake reuses an older commit).
pub fn concerns_commit(origin: &Origin) -> bool {
    matches!(origin, Origin::Commit | Origin::Deploy | Origin::Retry { .. })
}

/// Which [`NotifyEvent`] `event` is, if any. `rollout` is the event's rollout as stored now;
/// `first_drift` says whether the event is the first drift finding of its record (one
/// `drift.found` per drift check, not one per finding).
pub fn classify(event: &Event, rollout: &Rollout, first_drift: bool) -> Option<NotifyEvent> {
    if rollout.origin == Origin::Drift {
        let finding = matches!(
            event.kind,
            EventKind::DriftInstance | EventKind::DriftBackend | EventKind::DriftInfra
        );
        return (finding && first_drift).then_some(NotifyEvent::DriftFound);
    }
    if event.kind == EventKind::BakeFailed {
        return Some(NotifyEvent::BakeFailed);
    }
    let change = event.change.filter(|_| event.kind == EventKind::State)?;
    use RolloutState as S;
    Some(match (change.from, change.to) {
        (S::Pending | S::Scheduled, S::Baking | S::Reconciling | S::Rolling) => {
            NotifyEvent::RolloutStarted
        }
        (_, S::Succeeded) => NotifyEvent::RolloutSucceeded,
        (_, S::Failed) => NotifyEvent::RolloutFailed,
        (_, S::RolledBack) => NotifyEvent::RolloutRolledBack,
        // The canary gate pauses with this reason (`rollout::step`).
        (_, S::Paused) if event.message.contains("waiting for resume to promote") => {
            NotifyEvent::CanaryWaiting
        }
        (_, S::Paused) => NotifyEvent::RolloutPaused,
        _ => return None,
    })
}

/// The step a rollout was in when it left `from` for a failure.
fn failed_step(from: RolloutState, reason: Option<&str>) -> String {
    match from {
        RolloutState::Baking => "bake".into(),
        RolloutState::Reconciling => "reconcile".into(),
        RolloutState::Rolling if reason.is_some_and(|r| r.contains("health check")) => {
            "rolling: health check".into()
        }
        RolloutState::Rolling => "rolling".into(),
        other => other.as_str().into(),
    }
}

/// The text after the first `: ` of a state event's message (`rolling → failed: why`).
fn message_reason(message: &str) -> Option<&str> {
    message.split_once(": ").map(|(_, why)| why).filter(|why| !why.is_empty())
}

/// The notice for `event` (already classified as `kind`).
pub fn notice(
    kind: NotifyEvent,
    event: &Event,
    rollout: &Rollout,
    commit: Option<&CommitRecord>,
    public_url: &str,
) -> Notice {
    let fleet = rollout.fleet.clone();
    let what = match kind {
        NotifyEvent::RolloutStarted => "started".to_owned(),
        NotifyEvent::RolloutSucceeded => "succeeded".to_owned(),
        NotifyEvent::RolloutFailed => "failed".to_owned(),
        NotifyEvent::RolloutRolledBack => "rolled back".to_owned(),
        NotifyEvent::RolloutPaused => "paused".to_owned(),
        NotifyEvent::BakeFailed => "bake failed".to_owned(),
        NotifyEvent::DriftFound => "drift found".to_owned(),
        NotifyEvent::CanaryWaiting => "canary waiting for promotion".to_owned(),
    };
    let title = match &fleet {
        Some(fleet) => format!("{fleet}: rollout #{} {what}", rollout.id),
        None => format!("commit {}: {what}", rollout.revision.short()),
    };
    let failing = matches!(
        kind,
        NotifyEvent::RolloutFailed | NotifyEvent::RolloutRolledBack | NotifyEvent::BakeFailed
    );
    let state_reason = event.change.and_then(|_| message_reason(&event.message));
    let reason = match kind {
        NotifyEvent::BakeFailed => Some(event.message.clone()),
        NotifyEvent::RolloutStarted | NotifyEvent::RolloutSucceeded => None,
        _ => rollout.reason.clone().or_else(|| state_reason.map(str::to_owned)),
    };
    let failed_step = match (kind, event.change) {
        (NotifyEvent::BakeFailed, _) => Some("bake".to_owned()),
        (_, Some(change)) if failing => Some(failed_step(change.from, reason.as_deref())),
        _ => None,
    };
    let duration = rollout.started_at.map(|start| {
        let end = rollout.finished_at.filter(|_| rollout.state.is_terminal()).unwrap_or(event.at);
        human_duration((end - start).num_seconds())
    });
    Notice {
        event: kind,
        title,
        fleet,
        rollout: rollout.id.0,
        state: event.change.map_or(rollout.state, |c| c.to).as_str().to_owned(),
        commit: rollout.revision.0.clone(),
        short: rollout.revision.short().to_owned(),
        subject: commit.map_or_else(|| rollout.summary.clone(), |c| c.summary.clone()),
        author: commit.map(|c| c.author.clone()),
        image: rollout.image.as_ref().map(|i| i.0.clone()),
        previous_image: rollout.previous_image.as_ref().map(|i| i.0.clone()),
        duration,
        failed_step,
        reason,
        link: rollout_link(public_url, rollout.id.0),
        at: event.at,
    }
}

/// The rollout's place in the dashboard.
pub fn rollout_link(public_url: &str, id: u64) -> String {
    format!("{}/#rollout-{id}", public_url.trim_end_matches('/'))
}

/// A commit status state, as GitLab names them (GitHub and Gitea map them, see `forge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusState {
    /// Waiting to start.
    Pending,
    /// In progress.
    Running,
    /// Done, fine.
    Success,
    /// Done, failed.
    Failed,
    /// Stopped before the end (superseded, aborted).
    Canceled,
}

/// One commit status to post.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// The commit.
    pub sha: String,
    /// `kiln/bake`, `kiln/reconcile` or `kiln/rollout`.
    pub context: String,
    /// The state.
    pub state: StatusState,
    /// One line (forges cut it at 140 characters).
    pub description: String,
    /// The rollout in the dashboard.
    pub target_url: String,
}

/// The commit statuses a state change moves: each stage's (`kiln/bake` while baking,
/// `kiln/reconcile` while reconciling) and the rollout's.
pub fn statuses(event: &Event, rollout: &Rollout, public_url: &str) -> Vec<StatusUpdate> {
    if !concerns_commit(&rollout.origin) || rollout.fleet.is_none() {
        return Vec::new();
    }
    let Some(change) = event.change.filter(|_| event.kind == EventKind::State) else {
        return Vec::new();
    };
    use RolloutState as S;
    use StatusState as T;
    let fleet = rollout.fleet.as_deref().unwrap_or_default();
    let why = message_reason(&event.message).unwrap_or_default();
    let mut out = Vec::new();
    let mut push = |context: &str, state: StatusState, description: String| {
        let mut description = format!("{fleet}: {description}");
        if description.chars().count() > 140 {
            description = description.chars().take(139).collect::<String>() + "…";
        }
        out.push(StatusUpdate {
            sha: rollout.revision.0.clone(),
            context: context.to_owned(),
            state,
            description,
            target_url: rollout_link(public_url, rollout.id.0),
        });
    };
    for (stage, context) in [(S::Baking, "kiln/bake"), (S::Reconciling, "kiln/reconcile")] {
        if change.to == stage {
            push(context, T::Running, format!("{} running", &context[5..]));
        } else if change.from == stage {
            match change.to {
                S::Failed | S::RolledBack => push(context, T::Failed, why.to_owned()),
                S::Superseded | S::Aborted => push(context, T::Canceled, format!("{}", change.to)),
                S::Paused => {}
                _ => push(context, T::Success, format!("{} done", &context[5..])),
            }
        }
    }
    match (change.from, change.to) {
        (_, S::Scheduled) => push("kiln/rollout", T::Pending, "waiting for its schedule".into()),
        (S::Pending | S::Scheduled, S::Baking | S::Reconciling | S::Rolling) => {
            push("kiln/rollout", T::Running, format!("rollout #{} started", rollout.id))
        }
        (_, S::Paused) => push("kiln/rollout", T::Running, format!("paused: {why}")),
        (_, S::Succeeded) => {
            push("kiln/rollout", T::Success, format!("rollout #{} succeeded", rollout.id))
        }
        (_, S::Failed) => push("kiln/rollout", T::Failed, format!("failed: {why}")),
        (_, S::RolledBack) => push("kiln/rollout", T::Failed, format!("rolled back: {why}")),
        (_, S::Superseded | S::Aborted) => push("kiln/rollout", T::Canceled, change.to.to_string()),
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Revision, RolloutId};
    use crate::store::{Level, StateChange};

    fn rollout(state: RolloutState) -> Rollout {
        let mut r = Rollout::new(
            Some("web".into()),
            Revision("0123456789abcdef0123456789abcdef01234567".into()),
            "broken image".into(),
            "poll".into(),
            Origin::Commit,
            crate::model::now(),
        );
        r.id = RolloutId(4);
        r.state = state;
        r
    }

    fn change(from: RolloutState, to: RolloutState, message: &str) -> Event {
        let mut e = Event::new(RolloutId(4), Level::Info, EventKind::State, message, None);
        e.change = Some(StateChange { from, to });
        e
    }

    #[test]
    fn state_changes_map_to_notification_kinds_and_statuses() {
        use RolloutState as S;
        let r = rollout(S::RolledBack);
        let cases = [
            (S::Pending, S::Baking, "", Some(NotifyEvent::RolloutStarted)),
            (S::Rolling, S::Succeeded, "", Some(NotifyEvent::RolloutSucceeded)),
            (S::Baking, S::Failed, "baking → failed: exit 1", Some(NotifyEvent::RolloutFailed)),
            (S::Rolling, S::RolledBack, "", Some(NotifyEvent::RolloutRolledBack)),
            (
                S::Rolling,
                S::Paused,
                "rolling → paused: by operator",
                Some(NotifyEvent::RolloutPaused),
            ),
            (
                S::Rolling,
                S::Paused,
                "rolling → paused: canary: 1 instance(s) serving; waiting for resume to promote",
                Some(NotifyEvent::CanaryWaiting),
            ),
            (S::Baking, S::Reconciling, "", None),
            (S::Paused, S::Rolling, "", None),
        ];
        for (from, to, message, want) in cases {
            assert_eq!(classify(&change(from, to, message), &r, false), want, "{from} → {to}");
        }
        let bake = Event::new(RolloutId(4), Level::Error, EventKind::BakeFailed, "exit 2", None);
        assert_eq!(classify(&bake, &r, false), Some(NotifyEvent::BakeFailed));
        // A drift record: one `drift.found` for its first finding, none for the others, and its
        // record's own state (created `failed`) is not a failed rollout.
        let mut drift = rollout(S::Failed);
        drift.origin = Origin::Drift;
        let finding = Event::new(RolloutId(4), Level::Warn, EventKind::DriftInstance, "off", None);
        assert_eq!(classify(&finding, &drift, true), Some(NotifyEvent::DriftFound));
        assert_eq!(classify(&finding, &drift, false), None);
        assert_eq!(classify(&change(S::Pending, S::Failed, ""), &drift, false), None);
        assert!(statuses(&change(S::Pending, S::Failed, ""), &drift, "http://k").is_empty());

        let failed =
            change(S::Rolling, S::RolledBack, "rolling → rolled_back: health check failed");
        let got = statuses(&failed, &r, "http://kiln:1/");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].context.as_str(), got[0].state), ("kiln/rollout", StatusState::Failed));
        assert_eq!(got[0].target_url, "http://kiln:1/#rollout-4");
        let got = statuses(&change(S::Baking, S::Reconciling, "done"), &r, "http://k");
        let got: Vec<(&str, StatusState)> =
            got.iter().map(|s| (s.context.as_str(), s.state)).collect();
        assert_eq!(
            got,
            [("kiln/bake", StatusState::Success), ("kiln/reconcile", StatusState::Running)]
        );
        let mut repair = rollout(S::Rolling);
        repair.origin = Origin::Repair;
        assert!(statuses(&change(S::Pending, S::Rolling, ""), &repair, "http://k").is_empty());
    }

    #[test]
    fn a_notice_names_the_failed_step_the_reason_and_the_commit() {
        let mut r = rollout(RolloutState::RolledBack);
        r.reason = Some("health check GET /healthz on 127.0.0.1:5: 500".into());
        r.image = Some(crate::model::ImageRef("/images/web-2".into()));
        let commit = CommitRecord {
            revision: r.revision.clone(),
            parents: vec![],
            summary: "broken `image`".into(),
            author: "Alice <alice@example.com>".into(),
            committed_at: crate::model::now(),
            seen_at: crate::model::now(),
            kind: crate::store::CommitKind::Push,
            trigger: "poll".into(),
            tip: true,
        };
        let e = change(RolloutState::Rolling, RolloutState::RolledBack, "x");
        let n = notice(NotifyEvent::RolloutRolledBack, &e, &r, Some(&commit), "https://k.example");
        assert_eq!(n.title, "web: rollout #4 rolled back");
        assert_eq!(n.failed_step.as_deref(), Some("rolling: health check"));
        assert_eq!(n.short, "01234567");
        let md = n.markdown("## ");
        assert!(md.contains("failed step: **rolling: health check**"), "{md}");
        assert!(md.contains("broken 'image' by Alice"), "no backtick breaks the span: {md}");
        assert!(n.text().contains("https://k.example/#rollout-4"));
        assert_eq!(human_duration(3723), "1h 2m 3s");
    }
}
