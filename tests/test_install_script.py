"""deploy/install.sh installs what pdserve needs and leaves the machine's services alone."""

from __future__ import annotations

import re
from pathlib import Path

INSTALL = Path(__file__).resolve().parents[1] / "deploy" / "install.sh"


def test_installer_never_stops_starts_or_disables_a_service() -> None:
    script = INSTALL.read_text()
    commands = [line.split("#", 1)[0] for line in script.splitlines()]
    touching = [
        line.strip()
        for line in commands
        if re.search(r"\b(systemctl|pkill|killall|service|kill)\b", line)
    ]
    assert touching == [], f"install.sh touches services or processes: {touching}"


def test_prometheus_package_install_cannot_start_its_service() -> None:
    script = INSTALL.read_text()
    install = script.rindex("apt-get install -y -qq --no-install-recommends prometheus")
    # The policy that forbids service starts is written before the package is installed
    # and removed afterwards (also on failure, through the EXIT trap).
    assert script.index("exit 101") < install
    assert "trap" in script[:install] and 'rm -f "$policy"' in script[install:]
