"""The command line's fail-fast pieces (used by node/cli.py): an argument parser whose errors are one line, help that
shows every default, address checks, and a node's first contact with its coordinator (a visible countdown and a
give-up time instead of retrying an address that is wrong or a coordinator that is not there forever).

Exit statuses of ``lowband``: 0 done; 1 an unexpected error (a traceback: a bug); 2 a usage or configuration error
(one line naming what to fix; a coordinator's TLS certificate that does not verify is one); 3 a node's Join was
refused; 4 the coordinator kept failing (INTERNAL); 5 the coordinator stayed unreachable past ``--connect-timeout``;
130 interrupted. Nothing heavy is imported at module level: ``lowband node`` runs these before torch loads.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any, NoReturn

from node.errors import ConfigError

log = logging.getLogger(__name__)
EXIT_CODES = """exit status:
  0    done (a node: the run ended, or it was stopped and left)
  1    an unexpected error: a bug (please report the traceback)
  2    a usage or configuration error (a coordinator certificate that does not verify is one): one line says
       what to fix (supervisors should not restart)
  3    a node's Join was refused (wrong join token, another run, a name taken by another key);
       status: the read token was refused
  4    the coordinator kept failing (INTERNAL errors on its side)
  5    the coordinator stayed unreachable past --connect-timeout (status: did not answer)
  130  interrupted"""
UNREACHABLE_EXIT = 5


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the help names it already, or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default in (None, False, argparse.SUPPRESS) or default == [] or "default" in text
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), naming the command and pointing to its
    --help; subcommands get the same formatter and a description (their help when none is given)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", Parser)
        action = super().add_subparsers(**kwargs)
        plain_add = action.add_parser

        def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
            if "help" in kw and "description" not in kw:
                kw["description"] = kw["help"][:1].upper() + kw["help"][1:] + "."
            return plain_add(name, **kw)

        action.add_parser = add_parser  # type: ignore[method-assign]
        return action


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {value}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (a free one, remembered across restarts) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}")
    return int(text)


def coordinator_address(text: str, flag: str = "--coordinator") -> str:
    """``HOST:PORT`` as gRPC should dial it, or ConfigError saying what is wrong (a scheme, no port, a port that is
    not a number): gRPC would otherwise dial port 443 for a bare host, and retry an unparsable target forever."""
    value = text.strip()
    if "://" in value:
        scheme = value.split("://", 1)[0]
        raise ConfigError(f"{flag} {text!r}: give HOST:PORT without a scheme ({scheme}:// is not dialled; the "
                          f"channel is gRPC, with TLS from --tls-ca/--tls)")
    no_port = (f"{flag} {text!r}: no port; give HOST:PORT (the coordinator prints its address when it starts; its "
               "default port is 7070)")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or not value[end + 1:].startswith(":"):
            raise ConfigError(no_port)
        host, port = value[:end + 1], value[end + 2:]
    else:
        if value.count(":") > 1:
            raise ConfigError(f"{flag} {text!r}: an IPv6 address needs brackets and a port, e.g. [::1]:7070")
        host, sep, port = value.partition(":")
        if not sep:
            raise ConfigError(no_port)
    if not host.strip("[]"):
        raise ConfigError(f"{flag} {text!r}: no host; give HOST:PORT")
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{flag} {text!r}: the port must be a number 1..65535, got {port!r}")
    if any(c.isspace() or c in "/?#@\\" for c in host):
        raise ConfigError(f"{flag} {text!r}: {host!r} is not a host name or address")
    return f"{host}:{int(port)}"


def tls_problem(details: str, address: str, tls: Any, ca_path: str = "") -> str | None:
    """What a failed call's details say is wrong with the TLS between this client and the coordinator — a certificate
    that does not verify against the CA given, one that does not name the host dialled, a coordinator that does not
    speak TLS — as one line saying what to fix; None when they name no such problem (then it may be unreachable for
    now, and is retried). Retrying never fixes these. A closed socket is not one: a client certificate the coordinator
    refused looks like a connection it dropped."""
    if tls is None:
        return None
    ca = f"--tls-ca {ca_path}" if ca_path else ("--tls-ca" if tls.ca else "the system's CA roots (--tls)")
    if "CERTIFICATE_VERIFY_FAILED" in details:
        why = details.split("CERTIFICATE_VERIFY_FAILED", 1)[1].strip(": ").split(":")[0].strip()
        fix = ("renew it (`lowband certs --dir DIR --host HOST` issues a new one)" if "valid" in why or "expired" in why
               else "give --tls-ca the CA that issued it (`lowband certs --dir DIR` writes DIR/ca.pem)")
        return (f"coordinator {address}: its TLS certificate does not verify against {ca} "
                f"({why or 'verify failed'}): {fix}")
    if "Hostname Verification" in details:
        host = tls.server_name or address.rsplit(":", 1)[0]
        return (f"coordinator {address}: its TLS certificate does not name {host!r}: dial it by a name the certificate "
                "holds, give --tls-server-name NAME, or issue it for this host (`lowband certs --host HOST`)")
    if "WRONG_VERSION_NUMBER" in details:
        return (f"coordinator {address} does not speak TLS (a coordinator started without --tls-cert, or another "
                "service on that port): check the port, or drop --tls/--tls-ca for a plaintext coordinator on loopback")
    return None


class CoordinatorUnreachable(Exception):
    """The coordinator did not answer within the node's ``--connect-timeout``."""


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def wait_for_coordinator(address: str, tls: Any, give_up_s: float, *, rpc_timeout_s: float = 5.0,
                         out: Any = None, ca_path: str = "") -> None:
    """Ask the coordinator for its run (GetRun) until it answers at all; between tries one line on stderr with the
    reason, the next try and the give-up time. ``give_up_s`` ≤ 0: never give up. Raises CoordinatorUnreachable, or
    at once ConfigError for a TLS problem no retry fixes (``tls_problem``; ``ca_path``: --tls-ca, to name it)."""
    import grpc

    from node.proto.lowband.v1 import coordinator_pb2 as pb
    from node.proto.lowband.v1 import coordinator_pb2_grpc as pb_grpc
    from node.transport.grpc_auth import open_channel
    from node.transport.grpc_client import PROTOCOL_VERSION, tls_hint

    stream = out or sys.stderr
    started = time.monotonic()
    wait, last = 1.0, ""
    while True:
        raw, channel = open_channel(address, tls, ())
        try:
            pb_grpc.CoordinatorStub(channel).GetRun(pb.GetRunRequest(protocol_version=PROTOCOL_VERSION),
                                                    timeout=rpc_timeout_s)
            return
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return  # it answered (a refusal is the node's to report, with the token it will present)
            problem = tls_problem(exc.details() or "", address, tls, ca_path)
            if problem:
                raise ConfigError(problem) from None
            last = f"{exc.code().name}: {(exc.details() or '').splitlines()[0][:160]}{tls_hint(exc, tls)}"
        finally:
            raw.close()
        left = give_up_s - (time.monotonic() - started) if give_up_s > 0 else float("inf")
        if left <= 0:
            raise CoordinatorUnreachable(f"coordinator {address} unreachable for {_clock(give_up_s)} (last: {last}); "
                                         "check the address and that it runs, or raise --connect-timeout")
        wait = min(wait, left)
        until = "retrying until it answers" if give_up_s <= 0 else f"giving up in {_clock(left)}"
        print(f"lowband node: coordinator {address} not reachable ({last}); next try in {wait:.1f} s, {until}",
              file=stream, flush=True)
        time.sleep(wait)  # a countdown the operator watches, not a synchronisation
        wait = min(wait * 2, 10.0)
