// subrelay-dkim-bench: DKIM signing cost on one thread (RFC 6376 3.7 body hash plus the
// header hash and signature; rsa-sha256 per RFC 6376 3.3.1 with a 2048-bit key, RFC
// 8301; ed25519-sha256 per RFC 8463 3). Signs a realistic 4 KB message for N seconds
// per algorithm, three runs each, and prints the median signatures/s per core, then
// the StreamingBodyHash throughput (both canonicalisations in one pass) in MB/s.
//
//   subrelay-dkim-bench [seconds-per-run]      (default 1)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dkim/dkim.h"

using namespace subrelay::dkim;
using Clock = std::chrono::steady_clock;

namespace {

// Headers a submission client sends, and a plain-text body up to about 4 KB.
std::string makeMessage() {
  std::string m =
      "Received: from [192.0.2.10] (client.example.net [192.0.2.10])\r\n"
      "\tby relay.example.com (subrelay) with ESMTPSA id 4TqX2Y0ABCz\r\n"
      "\tfor <bob@example.net>; Fri, 1 Mar 2024 10:00:00 +0000\r\n"
      "From: Alice Example <alice@example.com>\r\n"
      "To: Bob Example <bob@example.net>, Carol <carol@example.org>\r\n"
      "Cc: Dave <dave@example.net>\r\n"
      "Subject: Re: Quarterly report, draft 3 (figures for review)\r\n"
      "Date: Fri, 1 Mar 2024 10:00:00 +0000\r\n"
      "Message-ID: <20240301100000.1a2b3c4d@example.com>\r\n"
      "In-Reply-To: <20240229170000.99887766@example.net>\r\n"
      "References: <20240228090000.11223344@example.net>\r\n"
      " <20240229170000.99887766@example.net>\r\n"
      "MIME-Version: 1.0\r\n"
      "Content-Type: text/plain; charset=utf-8\r\n"
      "Content-Transfer-Encoding: 8bit\r\n"
      "User-Agent: Example Mail 1.2\r\n"
      "\r\n";
  const std::string para =
      "Hi Bob,  thanks for the figures.  The totals in section 2 do not add up:\t\r\n"
      "the third column is off by the amount we discussed on Tuesday, and the  \r\n"
      "footnotes refer to a table that is no longer in the document.\r\n"
      "\r\n";
  while (m.size() < 4096 - para.size()) m += para;
  m += "-- \r\nAlice\r\n";
  return m;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
double ratePerSecond(double seconds, F&& op) {
  // Warm up once, then count operations until the time is up.
  op();
  auto t0 = Clock::now();
  auto deadline = t0 + std::chrono::duration<double>(seconds);
  uint64_t n = 0;
  Clock::time_point now;
  do {
    for (int i = 0; i < 16; ++i) op();
    n += 16;
    now = Clock::now();
  } while (now < deadline);
  return double(n) / std::chrono::duration<double>(now - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = argc > 1 ? std::atof(argv[1]) : 1.0;
  if (seconds <= 0) {
    std::fprintf(stderr, "usage: %s [seconds-per-run]\n", argv[0]);
    return 2;
  }
  const std::string msg = makeMessage();
  LocalSigner signer;
  SignOptions opts;
  opts.timestamp = 1709287200;

  std::printf("DKIM signing, one thread, %zu-byte message, median of 3 runs of %.1f s\n", msg.size(), seconds);
  for (Algorithm alg : {Algorithm::RsaSha256, Algorithm::Ed25519Sha256}) {
    auto key = generateKey(alg, 2048);
    if (!key) {
      std::fprintf(stderr, "keygen failed: %s\n", key.error().message.c_str());
      return 1;
    }
    std::vector<SignerKey> keys{{"example.com", "bench", *key}};
    bool failed = false;
    auto op = [&] {
      // What the server does per message: stream the body hash, then sign.
      StreamingBodyHash bh;
      bh.update(msg);
      auto d = bh.finish();
      auto r = signer.sign(msg, keys, opts, &d);
      if (!r) failed = true;
    };
    std::vector<double> runs;
    for (int i = 0; i < 3; ++i) runs.push_back(ratePerSecond(seconds, op));
    if (failed) {
      std::fprintf(stderr, "signing failed\n");
      return 1;
    }
    std::printf("  %-16s %9.0f signatures/s per core (runs: %.0f %.0f %.0f)\n",
                alg == Algorithm::RsaSha256 ? "rsa-sha256 2048" : "ed25519-sha256", median(runs), runs[0], runs[1],
                runs[2]);
  }

  // Body hash alone over 1 MB of the same text, both canonicalisations at once.
  std::string big = msg;
  while (big.size() < (1u << 20)) big += msg.substr(msg.find("\r\n\r\n") + 4);
  std::vector<double> mbps;
  for (int i = 0; i < 3; ++i) {
    double perSec = ratePerSecond(seconds, [&] {
      StreamingBodyHash bh;
      for (size_t p = 0; p < big.size(); p += 65536) bh.update(std::string_view(big).substr(p, 65536));
      (void)bh.finish();
    });
    mbps.push_back(perSec * double(big.size()) / 1e6);
  }
  std::printf("  body hash        %9.1f MB/s (simple+relaxed, SHA-256; runs: %.1f %.1f %.1f)\n", median(mbps),
              mbps[0], mbps[1], mbps[2]);
  return 0;
}
