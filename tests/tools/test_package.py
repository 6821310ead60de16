"""The moss_jax.tools package: its public names load on first use, and importing it loads no tool."""

import subprocess
import sys

import pytest

import moss_jax.tools as tools


def test_importing_the_package_loads_no_tool_module():
    code = "import sys, moss_jax.tools; print(sorted(m for m in sys.modules if m.startswith('moss_jax.tools.')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def test_every_public_name_resolves_to_its_defining_module():
    from moss_jax.tools import calculator, config, errors, registry, search_tool, solver, txt2img

    assert tools.calculate is calculator.calculate
    assert tools.ToolsConfig is config.ToolsConfig
    assert tools.ToolError is errors.ToolError
    assert tools.ToolRegistry is registry.ToolRegistry
    assert tools.search is search_tool.search
    assert tools.solve is solver.solve
    assert tools.text2image is txt2img.text2image
    for name in tools.__all__:
        assert getattr(tools, name) is not None
        assert name in dir(tools)


def test_unknown_names_and_submodules():
    with pytest.raises(AttributeError, match="no_such_name"):
        tools.no_such_name  # noqa: B018
    from moss_jax.tools import http_util  # a submodule, not a lazy export

    assert http_util.__name__ == "moss_jax.tools.http_util"
