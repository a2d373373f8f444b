"""Debian packages the renderer (fonts) and its tests (PDF rasterizer, QR decoder) need.

`make install` can call `missing_apt_packages()` and apt-get install the result:

    from services.invoice.pdf.system import missing_apt_packages
    apt_install(*missing_apt_packages())
"""

from __future__ import annotations

import os
import shutil

# package -> a file it installs (fonts used by the renderer; see fonts.py for the fallback chain)
FONT_PACKAGES: dict[str, str] = {
    "fonts-noto-core": "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "fonts-droid-fallback": "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "fonts-dejavu-core": "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
}
# package -> command (tests render pages to PNG and decode the QR code; the benchmark runs WeasyPrint)
TOOL_PACKAGES: dict[str, str] = {
    "poppler-utils": "pdftoppm",
    "zbar-tools": "zbarimg",
}
# WeasyPrint (benchmark comparison only) loads these shared libraries
WEASYPRINT_PACKAGES: tuple[str, ...] = ("libpango-1.0-0", "libpangoft2-1.0-0")

INSTALL_HINT = (
    "run `make install` (it must apt-get install "
    + " ".join([*FONT_PACKAGES, *TOOL_PACKAGES])
    + "; see services/invoice/pdf/system.py)"
)


def missing_apt_packages(*, tools: bool = True) -> list[str]:
    missing = [pkg for pkg, path in FONT_PACKAGES.items() if not os.path.exists(path)]
    if tools:
        missing += [pkg for pkg, cmd in TOOL_PACKAGES.items() if shutil.which(cmd) is None]
    return missing
