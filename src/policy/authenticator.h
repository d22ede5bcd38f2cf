// Authenticator: checks AUTH credentials against the configured accounts. Thread-safe;
// verify() is slow (scrypt) and runs on a worker thread, never on the event loop.
//
// A successful verification is remembered as HMAC-SHA256(process key, password) per
// username, so a client that connects once per message does not pay scrypt every time
// (Dovecot's auth cache does the same); the cache is checked in constant time and
// dropped on reload. Unknown usernames run a full scrypt against a dummy hash so they
// cost the same as a wrong password (no account probing).
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace subrelay::policy {

struct Credential {
  std::string username;
  std::string passwordHash;
};

enum class AuthCheck { Ok, BadCredentials };

class Authenticator {
 public:
  explicit Authenticator(std::vector<Credential> accounts);
  AuthCheck verify(std::string_view username, std::string_view password);
  // True when verify() would be answered from the cache (no scrypt needed): lets the
  // caller skip the thread hop.
  bool cachedOk(std::string_view username, std::string_view password);
  // HMAC-SHA256(process key, username, password): lets a session recognise a credential
  // it has already seen fail without keeping the password (a client retrying the same
  // wrong password with another mechanism is one failure, not two).
  std::string fingerprint(std::string_view username, std::string_view password) const {
    return mac(username, password);
  }

 private:
  std::string mac(std::string_view username, std::string_view password) const;
  std::map<std::string, std::string, std::less<>> hashes_;
  std::string dummyHash_;
  std::string macKey_;
  std::mutex mu_;
  std::map<std::string, std::string, std::less<>> cache_;  // username -> mac
};

}  // namespace subrelay::policy
