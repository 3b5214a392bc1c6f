"""``pilotctl trust ...``: who this node trusts, and trust requests in both directions."""

from __future__ import annotations

import sys
import time
from typing import cast

from ..errors import ConfigError
from ..terminal import escape_unsafe
from .context import Context, Handler
from .output import EXIT_OK, STATE_NAMES, Reply, TrustEntry, emit, fields, label, print_list
from .parser import Commands


def register(commands: Commands) -> None:
    trust = commands.group("trust", "who this node trusts")
    sub = trust.command("add", "trust a peer (pins the key its name resolves to now) and ask it "
                        "to trust us", add_cmd)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("--reason", default="", help="shown to the peer with the request")
    trust.command("pending", "trust requests waiting for approve/reject", pending_cmd)
    decisions: list[tuple[str, str, Handler]] = [
        ("approve", "trust a peer that asked us", approve_cmd),
        ("reject", "drop a peer's trust request", reject_cmd),
        ("remove", "stop trusting a peer (tears down its tunnels)", remove_cmd),
    ]
    for name, help_text, handler in decisions:
        trust.command(name, help_text, handler).add_argument("target", metavar="NAME|NODE_ID")
    trust.command("list", "trusted peers and pending requests", list_cmd)
    sub = trust.command("export", "print a signed trust request for a peer, to hand over out of "
                        "band (no beacon needed)", export_cmd)
    sub.add_argument("target", metavar="NAME|NODE_ID")
    sub.add_argument("--reason", default="")
    sub = trust.command("import", "take a trust request printed by 'trust export' on the peer",
                        import_cmd)
    sub.add_argument("request", metavar="REQUEST", help="the request, or - to read stdin")


def _print_entry_result(ctx: Context, result: Reply, verb: str) -> None:
    if ctx.json:
        emit(fields(result))
        return
    entry: TrustEntry = result["entry"]
    print(f"{verb} {label(entry)} ({entry['node_id']}): "
          f"{STATE_NAMES.get(entry['state'], entry['state'])}.")
    note: str | None = result.get("note")
    if note:
        print(note[0].upper() + note[1:] + ".")


def add_cmd(ctx: Context) -> int:
    result = ctx.call("trust_add", target=ctx.args.target, reason=ctx.args.reason)
    _print_entry_result(ctx, result, "Trusted")
    return EXIT_OK


def approve_cmd(ctx: Context) -> int:
    _print_entry_result(ctx, ctx.call("trust_approve", target=ctx.args.target), "Approved")
    return EXIT_OK


def reject_cmd(ctx: Context) -> int:
    _print_entry_result(ctx, ctx.call("trust_reject", target=ctx.args.target), "Rejected")
    return EXIT_OK


def remove_cmd(ctx: Context) -> int:
    from ..trust import remove_without_daemon  # not at the top: it loads pydantic

    removed = remove_without_daemon(ctx.home, ctx.args.target)  # None: a daemon runs, ask it
    result: Reply = {"entry": cast(TrustEntry, removed.public())} if removed else ctx.call(
        "trust_remove", target=ctx.args.target)
    entry: TrustEntry = result["entry"]
    dropped: int = result.get("messages_dropped", 0)
    if ctx.json:
        emit({"entry": entry, "messages_dropped": dropped})
    else:
        print(f"Removed {label(entry)} ({entry['node_id']}) from the trust store" + (
            f"; {dropped} of its unread messages were dropped." if dropped else "."))
    return EXIT_OK


def list_cmd(ctx: Context) -> int:
    entries: list[TrustEntry] = ctx.call("trust_list")["entries"]
    print_list(ctx.json, "entries", entries,
               "No trusted peers. Add one with 'pilotctl trust add NAME'.",
               ["NAME", "NODE ID", "STATE"], lambda e: [
                   _name(e), e["node_id"], STATE_NAMES.get(e["state"], e["state"])])
    return EXIT_OK


def _name(entry: TrustEntry) -> str:
    """A trusted entry's pinned name; a pending request's name as the claim it is."""
    name = entry.get("hostname")
    if not name:
        return "-"
    return f"claims {escape_unsafe(name)} (unverified)" if entry["state"] == "incoming" else name


def pending_cmd(ctx: Context) -> int:
    pending: list[TrustEntry] = ctx.call("trust_pending")["pending"]
    now = time.time()
    # The name in a request is the sender's claim: the beacon gives no name for a key without a
    # round trip per row, so it is shown as a claim (approving by it checks it with the beacon).
    # What another node wrote is shown with its control characters escaped.
    if print_list(ctx.json, "pending", pending, "No pending trust requests.",
                  ["NODE ID", "CLAIMED NAME", "RECEIVED", "REASON"], lambda e: [
                      e["node_id"], _name(e),
                      f"{now - e['updated_at']:.0f} s ago", escape_unsafe(e.get("reason") or "")]):
        print("Approve with 'pilotctl trust approve NODE_ID' (or by the claimed name, which the "
              "beacon must confirm), or reject with 'pilotctl trust reject NODE_ID'.")
    return EXIT_OK


def export_cmd(ctx: Context) -> int:
    result = ctx.call("trust_export", target=ctx.args.target, reason=ctx.args.reason)
    if ctx.json:
        emit({"request": result["request"], "to": result["to"]})
    else:
        print(result["request"])
    return EXIT_OK


def import_cmd(ctx: Context) -> int:
    text = (sys.stdin.read() if ctx.args.request == "-" else ctx.args.request).strip()
    if not text:
        raise ConfigError("no trust request given: pass what 'pilotctl trust export' printed "
                          "on the peer, or - to read it from stdin")
    entry: TrustEntry = ctx.call("trust_import", request=text)["entry"]
    if ctx.json:
        emit({"entry": entry})
    elif entry["state"] == "incoming":
        print(f"Trust request from {label(entry)} ({entry['node_id']}) is pending: approve it "
              f"with 'pilotctl trust approve {label(entry)}'.")
    else:
        print(f"Trust with {label(entry)} ({entry['node_id']}) is {entry['state']}.")
    return EXIT_OK
