// Command-line front end: `subrelay <command> [options]` (README.md "Command line").
// Exit status 0 on success, 1 on failure (one-line reason on stderr), 2 on usage errors.
#pragma once

namespace subrelay::app {

int cliMain(int argc, char** argv);

}  // namespace subrelay::app
