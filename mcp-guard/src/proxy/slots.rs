//! How many agent sessions may be open at once: in all (`daemon.max_sessions`) and per
//! principal (`daemon.max_sessions_per_principal`). Each `per_session` server is a process;
//! without a bound, agents could start them until the host runs out of memory, and one caller
//! could take every session the daemon allows.

use std::collections::HashMap;

use crate::policy::DaemonSettings;

/// The sessions open or being opened, in all and per principal.
#[derive(Debug, Default)]
pub(super) struct SessionSlots {
    taken: usize,
    by_principal: HashMap<String, usize>,
}

/// The limit that refused a session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionLimit {
    #[error("the daemon has {limit} sessions open (daemon.max_sessions)")]
    Daemon { limit: usize },
    #[error(
        "principal {principal:?} has {limit} sessions open (daemon.max_sessions_per_principal)"
    )]
    Principal { principal: String, limit: usize },
}

impl SessionLimit {
    /// The `reason` label of `mcp_guard_sessions_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Daemon { .. } => "daemon_limit",
            Self::Principal { .. } => "principal_limit",
        }
    }
}

impl SessionSlots {
    /// Takes a slot for a session of `principal`, or names the limit that refuses it (the
    /// principal's first: it says who to talk to).
    pub(super) fn take(
        &mut self,
        principal: &str,
        settings: &DaemonSettings,
    ) -> Result<(), SessionLimit> {
        let theirs = self.by_principal.get(principal).copied().unwrap_or(0);
        if theirs >= settings.max_sessions_per_principal {
            return Err(SessionLimit::Principal {
                principal: principal.to_owned(),
                limit: settings.max_sessions_per_principal,
            });
        }
        if self.taken >= settings.max_sessions {
            return Err(SessionLimit::Daemon {
                limit: settings.max_sessions,
            });
        }
        self.taken += 1;
        *self.by_principal.entry(principal.to_owned()).or_default() += 1;
        Ok(())
    }

    /// Gives back the slot of a session of `principal` that ended (or never opened).
    pub(super) fn give_back(&mut self, principal: &str) {
        self.taken = self.taken.saturating_sub(1);
        if let Some(theirs) = self.by_principal.get_mut(principal) {
            *theirs -= 1;
            if *theirs == 0 {
                self.by_principal.remove(principal);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_sessions: usize, max_sessions_per_principal: usize) -> DaemonSettings {
        DaemonSettings {
            max_sessions,
            max_sessions_per_principal,
            ..DaemonSettings::default()
        }
    }

    #[test]
    fn each_principal_gets_its_share_and_no_more() {
        let mut slots = SessionSlots::default();
        let settings = limits(10, 2);
        slots.take("alice", &settings).unwrap();
        slots.take("alice", &settings).unwrap();
        let refused = slots.take("alice", &settings).unwrap_err();
        assert_eq!(refused.reason(), "principal_limit");
        assert!(refused.to_string().contains("\"alice\" has 2"), "{refused}");
        slots.take("bob", &settings).unwrap();
        slots.give_back("alice");
        slots.take("alice", &settings).unwrap();
    }

    #[test]
    fn the_daemon_limit_holds_over_all_principals() {
        let mut slots = SessionSlots::default();
        let settings = limits(2, 2);
        slots.take("alice", &settings).unwrap();
        slots.take("bob", &settings).unwrap();
        let refused = slots.take("carol", &settings).unwrap_err();
        assert_eq!(refused, SessionLimit::Daemon { limit: 2 });
        slots.give_back("bob");
        slots.take("carol", &settings).unwrap();
        assert_eq!(
            slots.by_principal.get("bob"),
            None,
            "no empty entries are kept"
        );
    }
}
