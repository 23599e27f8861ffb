"""Entry point of the ``nomad-client`` command line: dispatches to command groups and
turns every failure into a message on stderr and an exit code (never a traceback).

Command groups live in their own modules (job, alloc, node, acl, var, operator, namespace,
service, scaling; ``job scale`` is in scaling, ``job dispatch`` and ``job periodic`` in
dispatch); ``agent`` is handed to the agent runner untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

from nomad_client.cli import (
    acl,
    alloc,
    dispatch,
    job,
    namespace,
    node,
    operator,
    scaling,
    service,
    var,
)
from nomad_client.cli.common import CommandError
from nomad_client.goflags import HelpRequested, UsageError

Command = Callable[[Sequence[str]], int]

GROUPS: Mapping[str, Mapping[str, Command]] = {
    "job": {**job.COMMANDS, **scaling.JOB_COMMANDS, **dispatch.JOB_COMMANDS},
    "alloc": alloc.COMMANDS,
    "node": node.COMMANDS,
    "acl": acl.COMMANDS,
    "var": var.COMMANDS,
    "operator": operator.COMMANDS,
    "namespace": namespace.COMMANDS,
    "service": service.COMMANDS,
    "scaling": scaling.COMMANDS,
}

USAGE = """\
Usage: nomad-client <command> [args]

Commands:
    agent          Run the agent
    job run        Parse, submit and monitor a job
    job status     List jobs or show one job
    job stop       Stop (and optionally purge) a job
    job scale      Change the count of a job's task group
    job dispatch   Dispatch a parameterized job (payload from a file or stdin, -meta)
    job periodic force  Launch a periodic job's child now
    alloc status   Show an allocation
    alloc logs     Print a task's stdout or stderr
    alloc fs       List or print files of an allocation
    alloc stop     Stop an allocation (it is replaced)
    alloc restart  Restart an allocation's tasks in place
    alloc signal   Send a signal to an allocation's tasks
    node status    List nodes or show one node
    node meta      Read or apply dynamic node metadata
    acl bootstrap  Bootstrap the ACL system and print the management token
    acl policy     Apply, list, show or delete ACL policies
    acl token      Create, list, show, update or delete ACL tokens (self: the one in use)
    acl role       Create, list, show, update or delete ACL roles
    var get        Read a variable (or one item of it)
    var put        Create or update a variable (check-and-set unless -force)
    var list       List variables
    var purge      Delete a variable
    var lock       Run a command while holding a variable's lock
    var init       Write an example variable specification
    operator root keyring list    List the root keys
    operator root keyring rotate  Make a new active root key (-full: re-encrypt everything)
    namespace apply   Create or update a namespace (by name, or from an HCL/JSON file)
    namespace list    List namespaces
    namespace status  Show a namespace
    namespace delete  Delete a namespace
    service list      List services registered with provider "nomad"
    service info      Show a service's registrations (-tag, -filter, -verbose)
    service delete    Delete one registration of a service
    scaling policy list   List scaling policies (-job, -type)
    scaling policy info   Show a scaling policy

Global flags for API commands: -address=<addr> (or $NOMAD_ADDR), -token=<token> (or
$NOMAD_TOKEN); for job, alloc, var and service commands also -namespace=<ns> (or
$NOMAD_NAMESPACE; "*" lists every namespace you may see). Flags take one dash (-detach) or
two (--detach).
"""


def _agent(argv: Sequence[str]) -> int:
    # Imported lazily: API commands must not pay for (or depend on) the agent's imports.
    from nomad_client.agent.run import run_agent_command

    return run_agent_command(list(argv))


def _dispatch(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "-help", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr, end="")
        return 0 if argv else 1
    name, rest = argv[0], argv[1:]
    if name == "agent":
        return _agent(rest)
    group = GROUPS.get(name)
    if group is None:
        raise UsageError(f"unknown command {name!r}", USAGE)
    if not rest or rest[0] in ("-h", "-help", "--help"):
        subs = ", ".join(sorted(group))
        text = f"Usage: nomad-client {name} <subcommand> [options]\n\nSubcommands: {subs}\n"
        if rest:
            print(text, end="")
            return 0
        raise UsageError(f"{name}: expected a subcommand ({subs})", text)
    command = group.get(rest[0])
    if command is None:
        raise UsageError(f"{name}: unknown subcommand {rest[0]!r}",
                         f"Subcommands: {', '.join(sorted(group))}")
    return command(rest[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 error, 2 job placement failure)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except HelpRequested as exc:
        print(exc.text, end="")
        return 0
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if exc.usage:
            print(exc.usage.rstrip(), file=sys.stderr)
        return 1
    except CommandError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do, and keep
        # the interpreter from complaining about the flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
    except Exception as exc:  # the CLI must never end in a traceback
        print(f"Error: unexpected failure: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
