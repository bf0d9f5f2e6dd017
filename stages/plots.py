"""`python -m stages.plots [show|diff ...]`: DVC's plots as an HTML page that renders with no network.

DVC's page loads Vega from a CDN, so on an air-gapped cluster (or behind a proxy) it stays blank. This writes an
HTML template for DVC with Vega, Vega-Lite and Vega-Embed inlined, taken at run time from the vl-convert-python
package (no third-party JavaScript is committed here), points the repository's local DVC config
(.dvc/config.local, not committed) at it, and runs `dvc plots` with the given arguments (default: `show`). After
one run, plain `dvc plots show` and `dvc plots diff` render offline too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(".dvc/plots_offline.html")  # git-ignored (.dvc/.gitignore); not in .dvc/tmp, which DVC may clear
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC plots</title>
    <script type="text/javascript">{bundle}</script>
    <style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def write_template(path: Path = TEMPLATE) -> Path:
    """Write DVC's HTML template with the chart libraries inlined (about 0.9 MB); returns its path.

    DVC fills `{plot_divs}` by plain replacement; its `{scripts}` placeholder (the CDN tags) is left out on purpose.
    Each chart's script calls the global `vegaEmbed`, which the bundle's default snippet defines.
    """
    import vl_convert

    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")  # stays inside its <script> tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.format(bundle=bundle), encoding="utf-8")
    return path


def main(argv: list[str]) -> int:
    if not Path(".dvc").is_dir():
        sys.exit("error: run this from the project root (the folder with .dvc/ and dvc.yaml)")
    write_template()
    # DVC reads plots.html_template relative to .dvc/
    dvc = [sys.executable, "-m", "dvc"]  # the DVC of this environment, whatever PATH says
    subprocess.run([*dvc, "config", "--local", "plots.html_template", str(TEMPLATE.relative_to(".dvc"))], check=True)
    return subprocess.call([*dvc, "plots", *(argv or ["show"])])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
