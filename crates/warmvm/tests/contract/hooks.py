"""Schemathesis hooks for the contract test (crates/warmvm/tests/schemathesis.rs).

They keep the VMs that generated requests create small and quiet, so that the run fits a
2-core CI machine, and keep the daemon's files inside the test's directory. Each rewrite
turns a valid value into another valid one and leaves invalid values alone, so no negative
case becomes positive and no positive case negative.
"""

import os

import schemathesis

# The daemon refuses more RAM than the host has (422), but a generated 8 GiB VM fits a
# large host, and the reference guest fills and verifies all of its RAM.
MAX_MEMORY_MIB = 16
MAX_VCPUS = 2
# Quiet, idle between passes, and touching only a small share of its RAM.
GUEST_CMDLINE = "quiet fill=10 interval_ms=1000"
SCRATCH = os.environ["WARMVM_CONTRACT_DIR"]


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.method.upper() != "POST" or case.path != "/v1/vms" or not isinstance(case.body, dict):
        return
    body = case.body
    mem = body.get("memory_mib")
    if _is_int(mem) and mem > MAX_MEMORY_MIB:
        body["memory_mib"] = MAX_MEMORY_MIB
    vcpus = body.get("vcpus")
    if _is_int(vcpus) and vcpus > MAX_VCPUS:
        body["vcpus"] = MAX_VCPUS
    cmdline = body.get("cmdline")
    if cmdline is None or (isinstance(cmdline, str) and "\0" not in cmdline and len(cmdline) <= 4095):
        if "cmdline" in body or "kernel" not in body:
            body["cmdline"] = GUEST_CMDLINE
    # The daemon runs as root: a generated console_log path would create files anywhere.
    # Only absolute ones are valid (pattern ^/); a relative one stays, to be refused.
    log = body.get("console_log")
    if isinstance(log, str) and log.startswith("/"):
        body["console_log"] = os.path.join(SCRATCH, "console-logs", "fuzz.log")
