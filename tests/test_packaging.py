"""Installing smpart must not claim the top-level name ``triton_kernels`` (DESIGN.md 6)."""

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
