// subrelay: SMTP submission relay gateway. Everything is wired in app/; see cli.cpp.
#include "app/cli.h"

int main(int argc, char** argv) { return subrelay::app::cliMain(argc, argv); }
