"""Installing smpart must not claim the top-level name ``triton_kernels`` (docs/ARCHITECTURE.md, "Layout")."""

import subprocess
import sys
import textwrap


def _run(code: str, cwd, env_path=None) -> str:
    env = None
    if env_path is not None:
        import os

        env = dict(os.environ, PYTHONPATH=str(env_path))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_existing_triton_kernels_module_is_untouched(tmp_path):
    other = tmp_path / "site" / "triton_kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OWNER = 'someone else'\n")
    got = _run(
        """
        import smpart.region, smpart.triton_kernels.dims
        import triton_kernels
        print(triton_kernels.OWNER, smpart.triton_kernels.dims.Q_LORA_RANK)
        """,
        cwd=tmp_path, env_path=tmp_path / "site",
    )
    assert got == "someone else 1536"


def test_smpart_installs_no_top_level_triton_kernels(tmp_path):
    got = _run(
        """
        import importlib.util, smpart.triton_kernels
        print(importlib.util.find_spec("triton_kernels") is None, smpart.triton_kernels.__name__)
        """,
        cwd=tmp_path,
    )
    assert got == "True smpart.triton_kernels"


def test_source_checkout_resolves_subpackages_without_the_mapping(tmp_path):
    """With only the repository root on sys.path and no site-packages (no editable-install finder:
    what an older setuptools' ``pip install -e .`` leaves on a GPU machine), ``smpart.triton_kernels``
    / ``smpart.bench`` / ``smpart.integration`` still resolve to the repository's folders."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import smpart.triton_kernels.dims as d, smpart.bench, "
            "smpart.integration; print(d.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(root)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert pathlib.Path(out.stdout.strip()) == root / "triton_kernels" / "dims.py"
