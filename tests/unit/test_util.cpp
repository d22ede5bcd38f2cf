// util/: the small string helpers shared by the parsers, the cleanup stage and delivery;
// the watchdog decisions (watchdog.h): when to ping systemd and which loop is stuck.
#include <doctest/doctest.h>

#include <chrono>
#include <string>
#include <vector>

#include "util/strings.h"
#include "util/watchdog.h"

using namespace subrelay;
using namespace subrelay::util;
using std::chrono::microseconds;
using std::chrono::milliseconds;

TEST_CASE("hasNonAscii: any octet >= 0x80") {
  CHECK_FALSE(util::hasNonAscii(""));
  CHECK_FALSE(util::hasNonAscii("user@example.org"));
  CHECK_FALSE(util::hasNonAscii(std::string("\x00\x01\x7f", 3)));  // controls and DEL are ASCII
  CHECK(util::hasNonAscii("\x80"));
  CHECK(util::hasNonAscii("\xff"));
  CHECK(util::hasNonAscii("j\xc3\xb6rg@example.org"));  // UTF-8 local part
  CHECK(util::hasNonAscii("Subject: plain\r\n\r\nbody \xe2\x82\xac"));  // only at the end
  CHECK(util::hasNonAscii(std::string("\x00\xc3", 2)));  // after a NUL
}

TEST_CASE("domainPart: after the last '@', as written") {
  CHECK(util::domainPart("user@example.org") == "example.org");
  CHECK(util::domainPart("User@Example.ORG") == "Example.ORG");  // no case folding
  CHECK(util::domainPart("\"a@b\"@example.org") == "example.org");  // quoted local part with '@'
  CHECK(util::domainPart("user@[192.0.2.1]") == "[192.0.2.1]");
  CHECK(util::domainPart("j\xc3\xb6rg@b\xc3\xbc" "cher.example") == "b\xc3\xbc" "cher.example");
  CHECK(util::domainPart("@example.org") == "example.org");
  CHECK(util::domainPart("user@").empty());
  CHECK(util::domainPart("postmaster").empty());  // no '@'
  CHECK(util::domainPart("").empty());
}

TEST_CASE("watchdogTimeout: WATCHDOG_USEC, and WATCHDOG_PID when set, must be ours") {
  CHECK(watchdogTimeout("30000000", nullptr, 42) == microseconds(30'000'000));
  CHECK(watchdogTimeout("2000000", "42", 42) == microseconds(2'000'000));
  CHECK_FALSE(watchdogTimeout("2000000", "43", 42));   // meant for another process
  CHECK_FALSE(watchdogTimeout("2000000", "", 42));
  CHECK_FALSE(watchdogTimeout("2000000", "4x2", 42));
  CHECK_FALSE(watchdogTimeout(nullptr, nullptr, 42));  // no watchdog
  CHECK_FALSE(watchdogTimeout("", nullptr, 42));
  CHECK_FALSE(watchdogTimeout("0", nullptr, 42));
  CHECK_FALSE(watchdogTimeout("-5", nullptr, 42));
  CHECK_FALSE(watchdogTimeout(" 5", nullptr, 42));
  CHECK_FALSE(watchdogTimeout("5s", nullptr, 42));
  CHECK_FALSE(watchdogTimeout("99999999999999999999999", nullptr, 42));  // overflows
  // Huge but valid: capped, never negative.
  auto big = watchdogTimeout("18446744073709551615", nullptr, 42);
  REQUIRE(big);
  CHECK(big->count() > 0);
}

TEST_CASE("heartbeatPeriod: a second, or a quarter of the allowed age when that is shorter") {
  CHECK(heartbeatPeriod(milliseconds(15'000)) == milliseconds(1000));
  CHECK(heartbeatPeriod(milliseconds(4000)) == milliseconds(1000));
  CHECK(heartbeatPeriod(milliseconds(1000)) == milliseconds(250));
  CHECK(heartbeatPeriod(milliseconds(8)) == milliseconds(10));
}

TEST_CASE("Heartbeat: stamp and read") {
  Heartbeat h(100);
  CHECK(h.lastMs() == 100);
  h.stamp(2500);
  CHECK(h.lastMs() == 2500);
  Heartbeat now;
  CHECK(now.lastMs() <= steadyMs());
  CHECK(now.lastMs() > steadyMs() - 60'000);
}

TEST_CASE("LoopWatch: pings while every loop is young enough") {
  LoopWatch w(milliseconds(1000));
  std::vector<LoopBeat> beats{{"worker 0", 10'000}, {"worker 1", 9'500}, {"delivery", 9'000}};
  auto s = w.check(beats, 10'000);
  CHECK(s.ping);
  CHECK_FALSE(s.logError);
  CHECK_FALSE(s.logInfo);
  // Exactly maxAge old still counts as alive.
  CHECK(w.check(beats, 10'000).ping);
  CHECK(w.check({{"delivery", 9'000}}, 10'000).ping);
  CHECK(w.check({}, 10'000).ping);
}

TEST_CASE("LoopWatch: a stuck loop stops the pings, is named once, and recovery is logged once") {
  LoopWatch w(milliseconds(10'000));
  std::vector<LoopBeat> beats{{"worker 0", 100'000}, {"worker 1", 88'000}, {"delivery", 99'500}};
  auto s = w.check(beats, 100'000);
  CHECK_FALSE(s.ping);
  CHECK(s.stuckLoop == "worker 1");
  CHECK(s.stuckForMs == 12'000);
  REQUIRE(s.logError);
  CHECK(*s.logError == "watchdog: worker 1 loop has not run for 12s; not pinging systemd");

  // Still stuck: no ping, no second log line.
  s = w.check(beats, 101'000);
  CHECK_FALSE(s.ping);
  CHECK(s.stuckForMs == 13'000);
  CHECK_FALSE(s.logError);
  CHECK_FALSE(s.logInfo);

  // The loop runs again: pinging resumes, logged once.
  beats[1].lastMs = 101'000;
  s = w.check(beats, 101'200);
  CHECK(s.ping);
  REQUIRE(s.logInfo);
  CHECK(s.logInfo->find("every loop runs again") != std::string::npos);
  CHECK_FALSE(s.logError);
  CHECK_FALSE(w.check(beats, 101'300).logInfo);
}

TEST_CASE("LoopWatch: the loop that has gone longest without a beat is the one named") {
  LoopWatch w(milliseconds(1000));
  auto s = w.check({{"worker 0", 1'000}, {"delivery", 500}, {"worker 1", 1'900}}, 3'000);
  CHECK_FALSE(s.ping);
  CHECK(s.stuckLoop == "delivery");
  REQUIRE(s.logError);
  CHECK(*s.logError == "watchdog: delivery loop has not run for 2.5s; not pinging systemd");
  // A stamp from the future (clock read on another core a moment later) is simply fresh.
  LoopWatch w2(milliseconds(1000));
  CHECK(w2.check({{"worker 0", 5'001}}, 5'000).ping);
}
