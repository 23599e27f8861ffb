"""Builds the task supervisor (``nomad_client/client/drivers/supervise.c``) with the system C
compiler; everything else about the package is in ``pyproject.toml``.

The binary goes next to the executor: into the build tree for a regular install, into the
source tree for an editable one. Without a working compiler the install still succeeds and
the executor keeps supervising its task in Python.
"""

from __future__ import annotations

import os
import sys

from setuptools import Command, setup
from setuptools.command.build import build

SOURCE = os.path.join("nomad_client", "client", "drivers", "supervise.c")
BINARY = os.path.join("nomad_client", "client", "drivers", "_supervise")
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror"]


class BuildSupervisor(Command):
    """Compile and link the supervisor; a missing or failing compiler is only a warning."""

    description = "build the compiled task supervisor"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        # Set by setuptools for an editable install: build into the source tree.
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _target(self) -> str:
        if self.editable_mode or self.build_lib is None:
            return BINARY
        return os.path.join(self.build_lib, BINARY)

    def run(self) -> None:
        if not sys.platform.startswith("linux"):
            return  # the supervisor relies on Linux's /proc and child subreapers
        # Imported here: only this command needs them, and they are setuptools' own.
        from distutils.ccompiler import new_compiler
        from distutils.errors import CCompilerError, DistutilsError
        from distutils.sysconfig import customize_compiler

        target = self._target()
        compiler = new_compiler()
        customize_compiler(compiler)
        try:
            objects = compiler.compile([SOURCE], output_dir=self.build_temp(),
                                       extra_preargs=CFLAGS)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            compiler.link_executable(objects, os.path.basename(target),
                                     output_dir=os.path.dirname(target))
        except (CCompilerError, DistutilsError, OSError) as exc:
            self.warn(f"cannot build the task supervisor ({exc}); "
                      "tasks will be supervised in Python")

    def build_temp(self) -> str:
        return str(self.get_finalized_command("build").build_temp)

    def get_outputs(self) -> list[str]:
        return [self._target()]

    def get_output_mapping(self) -> dict[str, str]:
        return {}

    def get_source_files(self) -> list[str]:
        return [SOURCE]


# Run with every build, regular or editable (setuptools runs build's sub-commands for both).
build.sub_commands.append(("build_supervisor", None))

setup(cmdclass={"build_supervisor": BuildSupervisor})
