// Replacing a small file whole: written to PATH.new (created with its final mode, so it is
// never readable by others, not even for a moment), optionally fsync-ed, then renamed over
// PATH. A reader sees the old file or the new one, never half of one.
#pragma once

#include <sys/types.h>

#include <string>

namespace subrelay::util {

// durable: fsync the data before the rename (keys, certificates); a status file that is
// rewritten every few seconds does not need it.
bool replaceFile(const std::string& path, const std::string& data, mode_t mode, bool durable);

}  // namespace subrelay::util
