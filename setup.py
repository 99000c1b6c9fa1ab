"""Build step that pyproject.toml cannot express: the wheel carries configs/ and evaluation/data/.

They stay at the repository's top level, where a source checkout uses them; `build_py` copies
them into the built package as `renio_pl/_shipped/`, where `renio_pl.resources` finds them in
an installed wheel. An editable install reads them from the checkout, so it copies nothing.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("configs", "evaluation/data")  # renio_pl.resources.SHIPPED


class BuildWithShippedFiles(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for relative in SHIPPED:
            source = Path(relative)
            if not source.is_dir():
                raise FileNotFoundError(f"{relative}/ is missing from the source tree; the wheel needs it")
            self.copy_tree(str(source), str(Path(self.build_lib) / "renio_pl" / "_shipped" / relative))


setup(cmdclass={"build_py": BuildWithShippedFiles})
