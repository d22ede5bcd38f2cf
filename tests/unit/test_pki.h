// A throwaway PKI for unit tests that run an HTTPS server in the process: a CA, a server
// certificate for one host name signed by it, and an unrelated second CA (for "wrong CA"
// cases). Made with the openssl command in a temporary directory, removed at exit.
#pragma once

#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace subrelay::testing {

inline std::string readWholeFile(const std::filesystem::path& p) {
  std::ifstream f(p);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

struct TestPki {
  std::filesystem::path dir;
  std::string ca, otherCa;  // PEM file paths
  std::string key, cert;    // PEM contents of the server's key and certificate

  // host: the certificate's DNS name; label: names the CAs and the temporary directory.
  TestPki(const std::string& host, const std::string& label) {
    std::string tmpl = (std::filesystem::temp_directory_path() / ("subrelay-" + label + "-XXXXXX")).string();
    REQUIRE(mkdtemp(tmpl.data()) != nullptr);
    dir = tmpl;
    const std::string d = dir.string();
    const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    auto sh = [](const std::string& cmd) { REQUIRE(std::system((cmd + " >/dev/null 2>&1").c_str()) == 0); };
    for (const char* stem : {"ca", "other"})
      sh("openssl req -x509 -new" + ec + " -keyout " + d + "/" + stem + ".key -out " + d + "/" + stem +
         ".pem -days 2 -subj '/CN=subrelay " + label + " test " + stem +
         "' -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign");
    {
      std::ofstream ext(d + "/ext");
      ext << "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
             "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:"
          << host << "\n";
    }
    sh("openssl req -new" + ec + " -keyout " + d + "/key.pem -out " + d + "/csr -subj /CN=" + host);
    sh("openssl x509 -req -in " + d + "/csr -CA " + d + "/ca.pem -CAkey " + d + "/ca.key -set_serial 7 -days 2 -out " +
       d + "/cert.pem -extfile " + d + "/ext");
    ca = d + "/ca.pem";
    otherCa = d + "/other.pem";
    key = readWholeFile(dir / "key.pem");
    cert = readWholeFile(dir / "cert.pem");
  }
  ~TestPki() {
    std::error_code e;
    std::filesystem::remove_all(dir, e);
  }
  TestPki(const TestPki&) = delete;
  TestPki& operator=(const TestPki&) = delete;
};

}  // namespace subrelay::testing
