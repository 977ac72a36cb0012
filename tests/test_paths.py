"""paths.check: the broker's checks on a job's script, data and output."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from msp import paths
from msp.errors import PathError


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An allowed root holding a script and a data folder."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "job.py").write_text("print('hi')\n")
    return root


@pytest.fixture
def roots(root: Path) -> tuple[Path, ...]:
    return paths.resolve_roots([str(root)])


def _good(root: Path) -> tuple[str, str, str]:
    return str(root / "job.py"), str(root / "data"), str(root / "out")


def _refused(script, data, output, roots) -> str:
    with pytest.raises(PathError) as info:
        paths.check(script, data, output, roots)
    assert info.value.code == "invalid_path"
    return info.value.message


# Accepted.


def test_good_paths_are_accepted(root, roots):
    found = paths.check(*_good(root), roots)
    assert found == paths.JobPaths(
        script=(root / "job.py").resolve().as_posix(),
        data=(root / "data").resolve().as_posix(),
        output=(root / "out").resolve().as_posix(),
    )
    # Checking creates nothing.
    assert not (root / "out").exists()


def test_existing_empty_output_folder_is_accepted(root, roots):
    (root / "out").mkdir()
    found = paths.check(*_good(root), roots)
    assert found.output == (root / "out").resolve().as_posix()


def test_nested_output_folder_that_does_not_exist_yet(root, roots):
    script, data, _ = _good(root)
    found = paths.check(script, data, str(root / "a" / "b" / "c"), roots)
    assert found.output == (root / "a" / "b" / "c").resolve().as_posix()


def test_paths_are_normalised(root, roots):
    found = paths.check(
        str(root / "data" / ".." / "job.py"),
        str(root / "." / "data" / ""),
        str(root / "x" / ".." / "out"),
        roots,
    )
    assert found.script == (root / "job.py").resolve().as_posix()
    assert found.data == (root / "data").resolve().as_posix()
    assert found.output == (root / "out").resolve().as_posix()


def test_symlink_inside_the_root_pointing_inside_it(root, roots):
    (root / "lib").mkdir()
    (root / "lib" / "real.py").write_text("")
    (root / "link.py").symlink_to(root / "lib" / "real.py")
    found = paths.check(
        str(root / "link.py"), str(root / "data"), str(root / "out"), roots
    )
    assert found.script == (root / "lib" / "real.py").resolve().as_posix()


def test_the_root_itself_may_be_the_output(root, tmp_path):
    # Output under a second root, equal to that root.
    other = tmp_path / "other"
    other.mkdir()
    roots = paths.resolve_roots([str(root), str(other)])
    found = paths.check(str(root / "job.py"), str(root / "data"), str(other), roots)
    assert found.output == other.resolve().as_posix()


@pytest.mark.parametrize(
    "folder, script, output",
    [
        ("données", "ñandú ü.py", "résultats"),
        ("δεδομένα", "σενάριο.py", "έξοδος"),
        ("数据", "脚本.py", "输出"),
        ("データ", "スクリプト 1.py", "出力"),
        ("emoji 🐍", "run 🚀.py", "out ✓"),
    ],
    ids=["french-spanish", "greek", "chinese", "japanese", "emoji"],
)
def test_unicode_names_are_accepted(root, roots, folder, script, output):
    data = root / folder
    data.mkdir()
    (data / script).write_text("")
    found = paths.check(
        str(data / script), str(data), str(root / output), roots
    )
    assert found.script == (data / script).resolve().as_posix()
    assert found.data == data.resolve().as_posix()
    assert found.output == (root / output).resolve().as_posix()


def test_unicode_script_in_a_data_subfolder(root, roots):
    (root / "données").mkdir()
    (root / "données" / "ñandú ü.py").write_text("")
    found = paths.check(
        str(root / "données" / "ñandú ü.py"),
        str(root / "data"),
        str(root / "out"),
        roots,
    )
    assert Path(found.script).name == "ñandú ü.py"


def test_component_of_exactly_255_bytes_is_accepted(root, roots):
    name = "é" * 127 + "x"  # 255 bytes in UTF-8
    assert len(name.encode()) == 255
    script, data, _ = _good(root)
    found = paths.check(script, data, str(root / name), roots)
    assert Path(found.output).name == name


# Refused: form of the path.


@pytest.mark.parametrize("which", ["script", "data", "output"])
def test_relative_path(root, roots, which):
    good = dict(zip(("script", "data", "output"), _good(root), strict=True))
    relative = {"script": "job.py", "data": "data", "output": "out"}[which]
    good[which] = relative
    message = _refused(good["script"], good["data"], good["output"], roots)
    assert relative in message
    assert "must be an absolute path" in message


def test_empty_path(root, roots):
    script, data, _ = _good(root)
    message = _refused(script, data, "", roots)
    assert message == "output folder: empty path"


def test_nul_byte(root, roots):
    script = str(root / "job.py") + "\0.txt"
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert message == f"script {script!r}: contains a NUL byte"


def test_lone_surrogate_is_not_utf8(root, roots):
    # What os.fsdecode makes of a file name holding the byte 0xff.
    script = str(root) + "/bad\udcffname.py"
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert message == f"script {script!r}: not valid UTF-8"


def test_path_longer_than_4096_bytes(root, roots):
    output = str(root) + "/" + "/".join(["d" * 100] * 41)
    assert len(output.encode()) > 4096
    script, data, _ = _good(root)
    message = _refused(script, data, output, roots)
    assert message.startswith(f"output folder {output[:200]}...")
    assert message.endswith(f"longer than {paths.MAX_PATH_BYTES} bytes")


def test_path_longer_than_4096_bytes_counts_bytes_not_characters(root, roots):
    # 1400 characters, but 4200 bytes in UTF-8.
    output = str(root) + "/" + "/".join(["数" * 50] * 28)
    assert len(output) < 4096 < len(output.encode())
    script, data, _ = _good(root)
    message = _refused(script, data, output, roots)
    assert message.endswith(f"longer than {paths.MAX_PATH_BYTES} bytes")


def test_path_of_exactly_4096_bytes(root, roots):
    script = str(root) + "/" + "/".join(["s" * 99] * 41)
    script = script[:4096]
    assert len(script.encode()) == 4096
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert script[:200] in message


@pytest.mark.parametrize("which", ["script", "data", "output"])
def test_component_longer_than_255_bytes(root, roots, which):
    good = dict(zip(("script", "data", "output"), _good(root), strict=True))
    long = str(root / ("n" * 256))
    good[which] = long
    message = _refused(good["script"], good["data"], good["output"], roots)
    assert long[:200] in message
    assert re.search(r"255|too long", message)


# Refused: outside the roots.


def test_dot_dot_escapes_the_root(root, roots, tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.py").write_text("")
    script = f"{root}/../outside/evil.py"
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert message.startswith(f"script {script}: resolves to ")
    assert str((tmp_path / "outside" / "evil.py").resolve().as_posix()) in message
    assert "outside the allowed roots" in message
    assert str(root.resolve()) in message


def test_dot_dot_escape_of_the_output(root, roots):
    output = f"{root}/out/../../elsewhere"
    script, data, _ = _good(root)
    message = _refused(script, data, output, roots)
    assert message.startswith(f"output folder {output}: resolves to ")
    assert "outside the allowed roots" in message


def test_symlink_inside_the_root_pointing_outside(root, roots, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("")
    (root / "link.py").symlink_to(outside / "secret.py")
    script = str(root / "link.py")
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert message.startswith(f"script {script}: resolves to ")
    assert str((outside / "secret.py").resolve().as_posix()) in message
    assert "outside the allowed roots" in message


def test_symlinked_data_folder_pointing_outside(root, roots, tmp_path):
    (tmp_path / "outside").mkdir()
    (root / "linked").symlink_to(tmp_path / "outside")
    script, _, output = _good(root)
    message = _refused(script, str(root / "linked"), output, roots)
    assert message.startswith(f"data folder {root / 'linked'}: resolves to ")


@pytest.mark.parametrize("below", ["", "/sub", "/sub/deeper"])
@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_dangling_symlink_output_pointing_outside(root, roots, tmp_path,
                                                  below, target):
    """An output folder under a link to a folder not made yet resolves
    where the link points, as Path.resolve() has it: outside."""
    (tmp_path / "outside").mkdir()
    gone = tmp_path / "outside" / "new"
    (root / "dangling").symlink_to(
        gone if target == "absolute" else os.path.relpath(gone, root)
    )
    script, data, _ = _good(root)
    output = str(root / "dangling") + below
    for memo in (None, {}):
        with pytest.raises(PathError) as info:
            paths.check(script, data, output, roots, memo)
        assert f"resolves to {gone.resolve()}{below}, outside" in \
            info.value.message


def test_symlink_loop(root, roots):
    (root / "loop").symlink_to(root / "loop")
    script = str(root / "loop")
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert message.startswith(f"script {script}: cannot be resolved")


def test_no_roots_configured(root):
    message = _refused(*_good(root), ())
    assert "outside the allowed roots (none configured;" in message


def test_sibling_with_a_common_prefix_is_outside(root, roots, tmp_path):
    # /x/root2 starts with the text /x/root but is not under it.
    sibling = tmp_path / "root2"
    sibling.mkdir()
    (sibling / "job.py").write_text("")
    message = _refused(
        str(sibling / "job.py"), str(root / "data"), str(root / "out"), roots
    )
    assert "outside the allowed roots" in message


# Refused: kind of file.


def test_missing_script(root, roots):
    script = str(root / "nope.py")
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert message == f"script {script}: not an existing file"


def test_script_that_is_a_folder(root, roots):
    script = str(root / "data")
    message = _refused(script, str(root / "data"), str(root / "out"), roots)
    assert message == f"script {script}: not an existing file"


def test_unreadable_script(root, roots):
    if os.geteuid() == 0:
        pytest.skip(
            "running as root: root can read any file, so a script with "
            "mode 000 is still readable and cannot be refused"
        )
    (root / "job.py").chmod(0)
    try:
        script = str(root / "job.py")
        message = _refused(
            script, str(root / "data"), str(root / "out"), roots
        )
        assert message == f"script {script}: not readable"
    finally:
        (root / "job.py").chmod(0o644)


def test_missing_data_folder(root, roots):
    data = str(root / "nodata")
    message = _refused(str(root / "job.py"), data, str(root / "out"), roots)
    assert message == f"data folder {data}: not an existing folder"


def test_data_that_is_a_file(root, roots):
    (root / "data.csv").write_text("a,b\n")
    data = str(root / "data.csv")
    message = _refused(str(root / "job.py"), data, str(root / "out"), roots)
    assert message == f"data folder {data}: not an existing folder"


def test_output_inside_data(root, roots):
    script, data, _ = _good(root)
    output = str(root / "data" / "out")
    message = _refused(script, data, output, roots)
    assert message == f"output folder {output}: inside the data folder {data}"


def test_output_deep_inside_data(root, roots):
    script, data, _ = _good(root)
    output = str(root / "data" / "a" / "b")
    message = _refused(script, data, output, roots)
    assert "inside the data folder" in message


def test_output_equal_to_data(root, roots):
    script, data, _ = _good(root)
    message = _refused(script, data, data, roots)
    assert message == f"output folder {data}: inside the data folder {data}"


def test_output_equal_to_data_through_a_symlink(root, roots):
    (root / "alias").symlink_to(root / "data")
    script, data, _ = _good(root)
    output = str(root / "alias")
    message = _refused(script, data, output, roots)
    assert message == f"output folder {output}: inside the data folder {data}"


def test_output_that_is_a_file(root, roots):
    (root / "out").write_text("")
    script, data, output = _good(root)
    message = _refused(script, data, output, roots)
    assert message == f"output folder {output}: exists and is not a folder"


def test_output_under_a_file(root, roots):
    script, data, _ = _good(root)
    output = str(root / "job.py" / "out")
    message = _refused(script, data, output, roots)
    assert message.startswith(f"output folder {output}: cannot be created")


def test_resolve_roots_expands_and_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r").mkdir()
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_roots(["~/r", "r", str(tmp_path / "r" / ".")]) == (
        (tmp_path / "r").resolve(),
    ) * 3


def test_output_holding_the_data_folder_is_refused(root, roots):
    script, data, _ = _good(root)
    message = _refused(script, data, str(root), roots)
    assert "holds the data folder" in message


# The fast resolver must agree with Path.resolve() on every path, links,
# loops, missing parts, "." and ".." included: a difference could let a
# path out of the allowed roots.
_PARTS = ("a", "b", "file", "up", "loop", "out", "missing", ".", "..", "")


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    top = tmp_path_factory.mktemp("maze")
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "file").write_text("x")
    (top / "a" / "up").symlink_to("..")
    (top / "a" / "out").symlink_to("/etc")
    (top / "a" / "b" / "loop").symlink_to("loop")
    (top / "b").symlink_to(top / "a" / "b")
    (top / "file").symlink_to("a/b/file")
    return top


def _resolved(raw):
    try:
        return str(Path(raw).resolve().as_posix())
    except (OSError, RuntimeError) as exc:
        return type(exc)


def _fast(raw, memo=None):
    try:
        return paths._realpath(raw, memo)[0]
    except (OSError, RuntimeError) as exc:
        return type(exc)


def test_fast_resolve_agrees_with_pathlib(maze):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    # The maze does not change: what one request learnt holds for all.
    memo = {}

    @hypothesis.settings(max_examples=400, deadline=None, database=None)
    @hypothesis.given(st.lists(st.sampled_from(_PARTS), max_size=7))
    def agree(parts):
        raw = "/".join([str(maze), *parts])
        assert _fast(raw) == _resolved(raw), raw
        assert _fast(raw, memo) == _resolved(raw), raw

    agree()


@pytest.mark.parametrize("rel", [
    "b/file", "a/up/a/out/passwd", "a/missing/../out", "a/b/loop",
    "b/new/deeper", "file/x", "a/b/file/", "a/./b/../b",
])
def test_fast_resolve_cases(maze, rel):
    raw = f"{maze}/{rel}"
    assert _fast(raw) == _resolved(raw)
