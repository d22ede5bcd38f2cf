// Password hashes for accounts[].password_hash.
//
// Format (PHC string style): "$scrypt$ln=15,r=8,p=1$<salt b64>$<key b64>" with a 16-byte
// random salt and a 32-byte derived key (RFC 7914 scrypt: memory-hard, ~32 MiB, tens of
// milliseconds). Verification recomputes the key and compares in constant time.
#pragma once

#include <string>
#include <string_view>

#include "util/result.h"

namespace subrelay::policy {

struct ScryptParams {
  int logN = 15;
  int r = 8;
  int p = 1;
};

util::Result<std::string> hashPassword(std::string_view password, ScryptParams params = {});
// False on a wrong password or a malformed hash. Constant time in the password.
bool verifyPassword(std::string_view password, std::string_view encodedHash);
// Syntax check for check-config: "" when fine, otherwise what is wrong.
std::string checkHashFormat(std::string_view encodedHash);

// The parameters of a well-formed hash (error: what is wrong with it).
util::Result<ScryptParams> hashParams(std::string_view encodedHash);
// A well-formed hash with random salt and key that no password matches: verifying
// against it costs the same as against a real hash with these parameters (used for
// unknown usernames).
std::string unmatchableHash(ScryptParams params);

// Constant-time equality of two byte strings (length may leak, contents do not).
bool constantTimeEquals(std::string_view a, std::string_view b);

}  // namespace subrelay::policy
