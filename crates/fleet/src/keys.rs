//! Where the fleet's records live in etcd. Every key is under [`ROOT`]; names that become
//! part of a key (hosts, VMs, plan ids) are checked by [`check_name`] first, so no name can
//! reach into another record's key.

/// The fleet's keyspace.
pub const ROOT: &str = "/warmvm/";

/// A host's membership record, under its daemon's lease (gone when the daemon is).
pub fn host(name: &str) -> String {
    format!("{ROOT}hosts/{name}")
}

pub fn hosts_prefix() -> String {
    format!("{ROOT}hosts/")
}

/// A drained host: the mark outlives the daemon's lease (an operator's decision).
pub fn drained(name: &str) -> String {
    format!("{ROOT}drained/{name}")
}

pub fn drained_prefix() -> String {
    format!("{ROOT}drained/")
}

/// The coordinator's election (etcd's election API keys its candidates under it).
pub fn election() -> String {
    format!("{ROOT}leader")
}

/// The plan that runs now (its id), if any: at most one at a time.
pub fn current_plan() -> String {
    format!("{ROOT}plan")
}

/// A plan's specification, as the operator gave it.
pub fn plan(id: &str) -> String {
    format!("{ROOT}plans/{id}/spec")
}

/// Where a plan stands (wave, status), written by the coordinator.
pub fn plan_progress(id: &str) -> String {
    format!("{ROOT}plans/{id}/progress")
}

/// One step of a plan: a host's reboot, from assigned to done or failed.
pub fn step(plan: &str, host: &str) -> String {
    format!("{ROOT}plans/{plan}/steps/{host}")
}

pub fn steps_prefix(plan: &str) -> String {
    format!("{ROOT}plans/{plan}/steps/")
}

/// One of the plan's `max_unavailable` slots; a host holds one across its step.
pub fn slot(index: u32) -> String {
    format!("{ROOT}slots/{index}")
}

pub fn slots_prefix() -> String {
    format!("{ROOT}slots/")
}

/// Set when a gate fails: every host watches it and starts no step while it is there.
pub fn halt() -> String {
    format!("{ROOT}halt")
}

/// A VM's owner (the host that may run it); switched by transaction at a migration's
/// commit point.
pub fn vm_owner(vm: &str) -> String {
    format!("{ROOT}vms/{vm}/owner")
}

/// The event history, ordered by key (a zero-padded sequence).
pub fn event(sequence: u64) -> String {
    format!("{ROOT}events/{sequence:020}")
}

pub fn events_prefix() -> String {
    format!("{ROOT}events/")
}

/// The last event's sequence number: every append compares its revision, so two appends
/// can never take the same number. Outside [`events_prefix`] so that reading the events
/// does not read it.
pub fn events_sequence() -> String {
    format!("{ROOT}events-sequence")
}

/// The etcd range end that makes `prefix` a prefix query (the prefix with its last byte
/// incremented), for transactions' compares over a whole prefix.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Host names, VM names and plan ids become one segment of a key: 1 to 63 of
/// `[a-z0-9-]` (a DNS label's letters, lower case), not starting or ending with `-`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty()
        || name.len() > 63
        || !ok_chars
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "{what} {name:?} is not 1 to 63 of a-z, 0-9 and '-' (not at either end)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_escape_their_segment_are_refused() {
        for bad in ["", "a/b", "..", "A", "-a", "a-", "a b", &"x".repeat(64)] {
            assert!(check_name("host", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "host-1", "h0", &"x".repeat(63)] {
            check_name("host", good).unwrap();
        }
    }

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end("/warmvm/hosts/"), b"/warmvm/hosts0".to_vec());
        assert!(host("a").as_bytes() < prefix_end(&hosts_prefix()).as_slice());
        assert!(drained("a").as_bytes() < hosts_prefix().as_bytes());
        let events = prefix_end(&events_prefix());
        assert!(
            events_sequence().as_bytes() < events_prefix().as_bytes()
                || events_sequence().as_bytes() >= events.as_slice()
        );
    }
}
