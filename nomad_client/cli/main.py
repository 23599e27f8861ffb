"""Entry point of the ``nomad-client`` command line: dispatches to command groups and
turns every failure into a message on stderr and an exit code (never a traceback).

Command groups live in their own modules (job, alloc, node, server, acl, var, operator,
namespace, service, scaling; ``job scale`` is in scaling, ``job dispatch`` and ``job
periodic`` in dispatch); ``agent`` is handed to the agent runner untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence

from nomad_client.cli import (
    acl,
    alloc,
    alloc_exec,
    dispatch,
    job,
    job_history,
    namespace,
    node,
    operator,
    plan,
    scaling,
    server,
    service,
    var,
)
from nomad_client.cli.common import CommandError
from nomad_client.goflags import HelpRequested, UsageError

Command = Callable[[Sequence[str]], int]

GROUPS: Mapping[str, Mapping[str, Command]] = {
    "job": {**job.COMMANDS, **job_history.COMMANDS, **plan.COMMANDS, **scaling.JOB_COMMANDS,
            **dispatch.JOB_COMMANDS},
    "alloc": {**alloc.COMMANDS, **alloc_exec.COMMANDS},
    "node": node.COMMANDS,
    "acl": acl.COMMANDS,
    "var": var.COMMANDS,
    "operator": operator.COMMANDS,
    "namespace": namespace.COMMANDS,
    "service": service.COMMANDS,
    "scaling": scaling.COMMANDS,
    "server": server.COMMANDS,
}

# Top-level shortcuts, as Nomad's ``nomad logs`` and ``nomad fs``.
ALIASES: Mapping[str, Command] = {"logs": alloc.logs_cmd, "fs": alloc.fs_cmd,
                                  # and ``nomad run``, ``status``, ``stop``
                                  "run": job.run_cmd, "status": job.status_cmd,
                                  "stop": job.stop_cmd, "exec": alloc_exec.exec_cmd}

USAGE = """\
Usage: nomad-client <command> [args]

Commands:
    agent          Run the agent
    version        Print the version
    job run        Parse, submit and monitor a job
    job plan       Dry-run a job: its diff and what the scheduler would do
    job status     List jobs or show one job
    job stop       Stop (and optionally purge) a job
    job history    Show a job's kept versions
    job inspect    Print a job (or -version N of it) as JSON
    job revert     Register an earlier version of a job again
    job validate   Check a job file without submitting it
    job eval       Create a new evaluation of a job (-force-reschedule)
    job scale      Change the count of a job's task group
    job dispatch   Dispatch a parameterized job (payload from a file or stdin, -meta)
    job periodic force  Launch a periodic job's child now
    alloc status   Show an allocation
    alloc logs     Print a task's stdout or stderr (-f follows, -tail -n/-c from the end)
    alloc fs       List or print files of an allocation
    logs, fs       Shortcuts for alloc logs and alloc fs
    run, status, stop  Shortcuts for job run, job status and job stop
    alloc stop     Stop an allocation (it is replaced)
    alloc restart  Restart an allocation's tasks in place
    alloc signal   Send a signal to an allocation's tasks
    alloc exec     Run a command in a running task (-t: a pty; exit status is the command's)
    exec           Shortcut for alloc exec
    server members List the cluster's servers (-detailed: with their tags)
    node status    List nodes or show one node
    node meta      Read or apply dynamic node metadata
    node eligibility  Mark a node eligible or ineligible for placements
    node drain     Drain a node (-enable|-disable, -deadline, -yes)
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
    operator metrics  Show the agent's metrics (-format prometheus)
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
$NOMAD_TOKEN), -region=<region> (or $NOMAD_REGION), -no-color (accepted; nothing is
coloured); for job, alloc, var and service commands also -namespace=<ns> (or
$NOMAD_NAMESPACE; "*" lists every namespace you may see). Commands that show API objects
take -json or -t '<go template>'. Flags take one dash (-detach) or two (--detach), and are
matched by their whole name only.
"""


def _agent(argv: Sequence[str]) -> int:
    # Imported lazily: API commands must not pay for (or depend on) the agent's imports.
    from nomad_client.agent.run import run_agent_command

    return run_agent_command(list(argv))


def _version(argv: Sequence[str]) -> int:
    # Imported lazily, like the agent: the version is the one the client fingerprints.
    from nomad_client.client.fingerprint import NOMAD_VERSION

    if argv and argv[0] in ("-h", "-help", "--help"):
        print("Usage: nomad-client version\n\n  Prints the version.")
        return 0
    if argv:
        raise UsageError("This command takes no arguments", "Usage: nomad-client version")
    print(f"Nomad v{NOMAD_VERSION} (nomad-client)")
    return 0


def _dispatch(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "-help", "--help", "help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr, end="")
        return 0 if argv else 1
    name, rest = argv[0], argv[1:]
    if name == "agent":
        return _agent(rest)
    if name in ALIASES:
        return ALIASES[name](rest)
    if name in ("version", "-version", "--version", "-v"):
        return _version(rest)
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
