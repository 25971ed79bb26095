"""The zipapp: reproducible build, contents, shebang, vendored pure-Python PyYAML.

Unit tier: needs no root.  Builds with `make` in two private copies of the tree (so a
concurrent `make` in the work tree is not disturbed), sharing the work tree's download
cache build/dl (filled once from PyPI, offline after that).
"""
import ast
import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHEBANG = "/usr/bin/python3"
# the build inputs: the fixed top level, less tests/, README.md and .ci/
TREE = ("Makefile", "sshlog.py", "bpf_probes.c", "conf.d", "samples")


def _build_env(**extra):
    env = dict(os.environ)
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(name, None)
    env.update(extra)
    return env


def _copy_tree(dest, fresh_mtimes):
    os.makedirs(dest)
    for name in TREE:
        src = os.path.join(REPO, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name),
                            copy_function=shutil.copy if fresh_mtimes else shutil.copy2,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif os.path.exists(src):
            (shutil.copy if fresh_mtimes else shutil.copy2)(src, os.path.join(dest, name))


def _make(tree, out, python, tz, umask):
    cmd = ["make", "-C", tree, "PYZ=" + out, "PYTHON=" + python,
           "DL_DIR=" + os.path.join(REPO, "build", "dl")]
    proc = subprocess.run(cmd, env=_build_env(TZ=tz), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=600,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, "%s failed:\n%s" % (" ".join(cmd), proc.stdout)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two builds of the same sources: different copies, mtimes, TZ, umask, interpreter."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if not os.path.exists(os.path.join(REPO, "Makefile")):
        pytest.skip("no Makefile in %s" % REPO)
    base = str(tmp_path_factory.mktemp("pyz"))
    tree_a, tree_b = os.path.join(base, "a"), os.path.join(base, "b")
    _copy_tree(tree_a, fresh_mtimes=False)
    _copy_tree(tree_b, fresh_mtimes=True)
    # the build interpreter on PATH for one, the interpreter running the tests for the other
    pyz_a = _make(tree_a, os.path.join(base, "a.pyz"), "python3", "UTC", 0o022)
    pyz_b = _make(tree_b, os.path.join(base, "b.pyz"), sys.executable,
                  "America/Los_Angeles", 0o077)
    return tree_a, pyz_a, pyz_b


@pytest.fixture(scope="module")
def pyz(builds):
    return builds[1]


def _source_version(tree):
    with open(os.path.join(tree, "sshlog.py")) as fh:
        module = ast.parse(fh.read())
    for node in module.body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("sshlog.py defines no __version__")


def _pyenv_bin():
    """A bin dir whose python3 is not the distro's: this interpreter's, or a pyenv one."""
    if os.path.realpath(sys.executable) != os.path.realpath(SHEBANG):
        return os.path.dirname(sys.executable)
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin")))
    return found[-1] if found else None


def test_build_is_reproducible(builds):
    _, pyz_a, pyz_b = builds
    with open(pyz_a, "rb") as a, open(pyz_b, "rb") as b:
        assert a.read() == b.read(), "two builds of the same sources differ"


def test_archive_layout(pyz):
    with open(pyz, "rb") as fh:
        assert fh.readline() == ("#!%s\n" % SHEBANG).encode()
    assert os.stat(pyz).st_mode & 0o111, "sshlog.pyz is not executable"
    with zipfile.ZipFile(pyz) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert zf.testzip() is None
    for needed in ("sshlog.py", "__main__.py", "yaml/__init__.py", "yaml/LICENSE",
                   "pyte/__init__.py", "pyte/LICENSE", "wcwidth/__init__.py",
                   "wcwidth/LICENSE"):
        assert needed in names
    if os.path.exists(os.path.join(REPO, "bpf_probes.c")):
        assert "bpf_probes.c" in names
    for name in names:
        assert not name.endswith((".so", ".pyc", ".pyo")), name
        assert "__pycache__" not in name and ".dist-info" not in name, name
        assert not name.startswith(("_yaml/", "PyYAML.libs/")), name
    assert names == sorted(names)
    assert {i.date_time for i in infos} == {(2000, 1, 1, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos if not i.is_dir()} == {0o100644}


def test_runs_alone_with_distro_python(pyz, builds, tmp_path):
    if not os.access(SHEBANG, os.X_OK):
        pytest.skip("no %s on this machine" % SHEBANG)
    alone = tmp_path / "sshlog.pyz"
    shutil.copy2(pyz, str(alone))
    path = os.environ.get("PATH", "/usr/bin:/bin")
    first = _pyenv_bin()
    env = dict(os.environ, PATH=(first + os.pathsep + path) if first else path)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["./sshlog.pyz", "version"], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first_line = proc.stdout.splitlines()[0] if proc.stdout else ""
    assert first_line.split()[:2] == ["sshlog", _source_version(builds[0])], proc.stdout


@pytest.mark.parametrize("python", [SHEBANG, sys.executable], ids=["distro", "running"])
def test_vendored_yaml_is_pure_python(pyz, python, tmp_path):
    if not os.access(python, os.X_OK):
        pytest.skip("no %s on this machine" % python)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import yaml, pyte, wcwidth\n"
        "assert yaml.safe_load('a: [1, {b: c}]') == {'a': [1, {'b': 'c'}]}\n"
        "print(yaml.__file__); print(yaml.__with_libyaml__); print(yaml.__version__)\n"
        "print(pyte.__file__); print(wcwidth.__file__)\n"
    )
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # make test puts build/vendor there
    proc = subprocess.run([python, "-c", code, pyz], cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    yaml_file, with_libyaml, version, pyte_file, wcwidth_file = proc.stdout.split()
    for module_file in (yaml_file, pyte_file, wcwidth_file):
        assert module_file.startswith(pyz + os.sep), module_file
    assert with_libyaml == "False"
    assert version == "6.0.2"


def test_pyz_runs_the_embedded_default_configuration(tmp_path):
    """Without a configuration directory the zipapp uses its own conf.d."""
    pyz = os.path.join(REPO, "sshlog.pyz")
    if not os.path.exists(pyz):
        pytest.skip("sshlog.pyz not built (make)")
    lone = tmp_path / "sshlog.pyz"
    shutil.copy(pyz, lone)
    r = subprocess.run([sys.executable, str(lone), "check-config"], capture_output=True,
                       timeout=30, cwd=str(tmp_path))
    if os.path.isdir("/etc/sshlog"):
        pytest.skip("/etc/sshlog exists here: the embedded default is not used")
    assert r.returncode == 0, r.stderr
    assert b"<embedded>/conf.d/log_events.yaml" in r.stdout
    assert b"log_events [eventlogfile_action]" in r.stdout


def test_pyz_reads_its_probes_when_run_by_a_relative_path(tmp_path):
    """`./sshlog.pyz` (relative) must find bpf_probes.c inside itself."""
    pyz = os.path.join(REPO, "sshlog.pyz")
    if not os.path.exists(pyz):
        pytest.skip("sshlog.pyz not built (make)")
    if not os.path.isdir("/sys/kernel/tracing/events/syscalls"):
        pytest.skip("tracefs not readable here")
    shutil.copy(pyz, tmp_path / "sshlog.pyz")
    r = subprocess.run(["./sshlog.pyz", "dump-probes"], capture_output=True, timeout=30,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert b"TRACEPOINT_PROBE(sched, sched_process_exec)" in r.stdout
    assert b"-DARGV_CAP=" in r.stdout.splitlines()[0]
