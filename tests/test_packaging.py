"""The source distribution carries what building the package needs: every file of csrc/ (setuptools adds only the
extension's listed sources, not the headers they include: without MANIFEST.in a wheel built from the sdist failed to
compile) and every module of the package."""
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".pyc")}


def test_sdist_holds_the_extension_sources_and_the_package(tmp_path):
    # egg_info into tmp_path: a SOURCES.txt left in the tree by an earlier install would add its files to the sdist
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "-d",
                    str(tmp_path)], cwd=REPO, check=True, capture_output=True)
    (archive,) = tmp_path.glob("t2t_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        # members are "<name>-<version>/<path>"
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = _files_under(REPO / "csrc") | _files_under(REPO / "t2t_kernels") | {"setup.py", "pyproject.toml",
                                                                                  "README.md"}
    assert any(name.endswith(".h") for name in wanted)
    assert wanted <= held, sorted(wanted - held)
