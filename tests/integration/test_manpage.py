"""The man page subrelay(8) (man/subrelay.8, configured into the build dir and installed to
man8) cannot drift from the command line: every command and queue subcommand that
`subrelay --help` lists is described in its COMMANDS section, and every option that any
`subrelay <command> --help` prints appears in it. It renders with groff and man-db without a
single warning."""

import os
import re
import shutil

import harness
from harness import subrelay

MANPAGE = os.environ.get("SUBRELAY_MANPAGE", "")
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "ENVIRONMENT", "SIGNALS",
            "EXIT STATUS", "FILES", "SEE ALSO")


def help_text(*args):
    proc = subrelay(*args, "--help", timeout=10)
    if proc.returncode != 0:
        raise AssertionError(f"subrelay {' '.join(args)} --help exited {proc.returncode}")
    return proc.stdout.decode()


def listed_commands():
    """From the `commands:` section of `subrelay --help`: the first word of each entry, and
    `queue SUB` for every queue subcommand named on a line (queue retry, queue drop, ...)."""
    cmds, in_section = [], False
    for line in help_text().splitlines():
        if line.strip() == "commands:":
            in_section = True
            continue
        if in_section and line and not line.startswith(" "):
            break
        if not in_section or not line.startswith("  ") or line.startswith(" " * 8):
            continue
        first = line.split()[0]
        if first == "queue":
            cmds.extend(("queue", sub) for sub in re.findall(r"\bqueue ([a-z]+)", line))
        else:
            cmds.append((first,))
    return cmds


def options_of(text):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*|-[a-z])\b", text))


def roff_plain(text):
    """The roff source with escapes a reader does not see removed: \\- is -, font changes go."""
    text = text.replace("\\-", "-").replace("\\(aq", "'")
    return re.sub(r"\\f[BIRP]", "", text)


def man_section(text, name):
    m = re.search(r"^\.SH \"?" + re.escape(name) + r"\"?\n(.*?)(?=^\.SH |\Z)", text, re.M | re.S)
    return m.group(1) if m else ""


class ManPage(harness.ServerTestCase):
    def setUp(self):
        super().setUp()
        self.assertTrue(MANPAGE and os.path.isfile(MANPAGE), f"SUBRELAY_MANPAGE={MANPAGE!r}")
        with open(MANPAGE) as f:
            self.source = f.read()
        self.plain = roff_plain(self.source)

    def test_configured(self):
        self.assertIsNone(re.search(r"@[A-Za-z_]+@", self.source), "a placeholder was not substituted")
        version = subrelay("--version").stdout.decode().split()[1]
        th = re.search(r'^\.TH SUBRELAY 8 "[^"]+" "subrelay ([^"]+)"', self.source, re.M)
        self.assertIsNotNone(th, "no .TH SUBRELAY 8 line")
        self.assertEqual(th.group(1), version)

    def test_sections(self):
        for name in SECTIONS:
            with self.subTest(section=name):
                self.assertTrue(man_section(self.plain, name).strip(), f"no .SH {name}")

    def test_every_listed_command_is_described(self):
        cmds = listed_commands()
        # The parse found what --help lists today (a change of its layout must not make
        # this test vacuous).
        for known in (("serve",), ("check-config",), ("queue", "list"), ("queue", "bounce"),
                      ("accounts",)):
            self.assertIn(known, cmds)
        described = man_section(self.plain, "COMMANDS")
        for cmd in cmds:
            with self.subTest(cmd=" ".join(cmd)):
                # A .TP heading: `.B serve`, `.B queue list`, `.BI "queue show " id`.
                rx = r"^\.(?:B|BI|BR)\s+\"?" + re.escape(" ".join(cmd)) + r"(?:\s|\"|$)"
                self.assertRegex(described, re.compile(rx, re.M), "not described under COMMANDS")
                self.assertIn("subrelay\n.B " + cmd[0], self.plain, "not in the SYNOPSIS")

    def test_every_option_is_in_the_man_page(self):
        cmds = {c[0] for c in listed_commands()}
        texts = {"": help_text()}
        for c in sorted(cmds):
            texts[c] = help_text(c)
        for cmd, text in texts.items():
            for opt in sorted(options_of(text)):
                with self.subTest(cmd=cmd, option=opt):
                    self.assertRegex(self.plain, r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])")

    def test_renders_without_warnings(self):
        for tool in ("groff", "man"):
            self.assertIsNotNone(shutil.which(tool), f"{tool} is not installed (scripts/lib/deps.sh)")
        env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
        proc = harness.run(["groff", "-man", "-Tutf8", "-ww", "-z", MANPAGE], env=env)
        self.assertEqual(proc.returncode, 0)
        self.assertEqual(proc.stderr.decode(), "", "groff warnings")
        proc = harness.run(["man", "--warnings", "-l", MANPAGE], env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode())
        self.assertEqual(proc.stderr.decode(), "", "man warnings")
        page = proc.stdout.decode()
        self.assertIn("SUBRELAY(8)", page)
        self.assertIn("EXIT STATUS", page)


if __name__ == "__main__":
    harness.main()
