// webhook/: signatures (known answers: RFC 4231 and a value computed independently with
// Python's hmac module), verification (tolerance, tampering), event JSON, the outbox policy
// on a fake clock, and the outbox in the queue store: events written in the transaction of
// the state change, none for idempotent repeats, DSNs or accounts without a webhook.
#include <doctest/doctest.h>
#include <sqlite3.h>

#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "queue/sqlite_store.h"
#include "webhook/dispatcher.h"
#include "webhook/event.h"
#include "webhook/outbox_policy.h"
#include "webhook/signature.h"

using namespace subrelay;
using namespace subrelay::webhook;
using Json = nlohmann::json;
using std::chrono::seconds;

TEST_CASE("HMAC-SHA256 known answers") {
  // RFC 4231 section 4.3, test case 2.
  CHECK(hmacSha256Hex("Jefe", "what do ya want for nothing?") ==
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  // python3 -c 'import hmac,hashlib; print(hmac.new(b"whsec_test", b"1700000000.{\"id\":\"evt_1\"}",
  //             hashlib.sha256).hexdigest())'
  CHECK(sign("whsec_test", 1700000000, R"({"id":"evt_1"})") ==
        "v1=c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925");
  CHECK(hmacSha256Hex("", "").size() == 64);
}

TEST_CASE("verify: signature, timestamp tolerance, tampering") {
  const std::string body = R"({"id":"evt_2","type":"delivered"})";
  const std::string sig = sign("s3cret", 1000, body);
  CHECK(verify("s3cret", "1000", body, sig, 1000, 300));
  CHECK(verify("s3cret", "1000", body, sig, 1300, 300));
  CHECK_FALSE(verify("s3cret", "1000", body, sig, 1301, 300));  // replayed too late
  CHECK_FALSE(verify("s3cret", "1000", body, sig, 699, 300));   // from the future
  CHECK_FALSE(verify("s3cret", "1001", body, sig, 1000, 300));  // timestamp changed
  CHECK_FALSE(verify("other", "1000", body, sig, 1000, 300));
  CHECK_FALSE(verify("s3cret", "1000", body + " ", sig, 1000, 300));
  CHECK_FALSE(verify("s3cret", "10x0", body, sig, 1000, 300));
  CHECK_FALSE(verify("s3cret", "", body, sig, 1000, 300));
  CHECK(constantTimeEqual("abc", "abc"));
  CHECK_FALSE(constantTimeEqual("abc", "abd"));
  CHECK_FALSE(constantTimeEqual("abc", "abcd"));
  CHECK(constantTimeEqual("", ""));
}

TEST_CASE("event JSON") {
  Event e;
  e.id = newEventId();
  e.type = EventType::Bounced;
  e.account = "shop";
  e.messageId = "Q1";
  e.sender = "a@shop.example";
  e.recipient = "b\"x@example.org";
  e.at = 1764732136;  // 2025-12-03T03:22:16Z
  e.attempt = 2;
  e.smtpCode = 550;
  e.enhancedCode = "5.1.1";
  e.reply = "550 5.1.1 no such user \xff";
  e.remoteHost = "mx.example.org";
  e.reason = "550 5.1.1 no such user";
  const Json j = Json::parse(eventJson(e));
  CHECK(j["id"] == e.id);
  CHECK(j["type"] == "bounced");
  CHECK(j["account"] == "shop");
  CHECK(j["message_id"] == "Q1");
  CHECK(j["sender"] == "a@shop.example");
  CHECK(j["recipient"] == "b\"x@example.org");
  CHECK(j["at"] == "2025-12-03T03:22:16Z");
  CHECK(j["attempt"] == 2);
  CHECK(j["smtp"]["code"] == 550);
  CHECK(j["smtp"]["enhanced_code"] == "5.1.1");
  CHECK(j["smtp"]["remote_host"] == "mx.example.org");
  CHECK(j["smtp"]["reply"] == "550 5.1.1 no such user \xEF\xBF\xBD");  // not UTF-8 -> U+FFFD
  CHECK(j["reason"] == "550 5.1.1 no such user");

  Event a;
  a.id = "evt_x";
  a.type = EventType::Accepted;
  const Json k = Json::parse(eventJson(a));
  CHECK_FALSE(k.contains("attempt"));
  CHECK_FALSE(k.contains("smtp"));
  CHECK_FALSE(k.contains("reason"));

  CHECK(newEventId() != newEventId());
  CHECK(newEventId().size() == 36);
  for (auto t : {EventType::Accepted, EventType::Delivered, EventType::Deferred, EventType::Bounced,
                 EventType::Suppressed, EventType::Expired})
    CHECK(parseEventName(eventName(t)) == t);
  CHECK_FALSE(parseEventName("sent").has_value());
}

TEST_CASE("outbox policy on a fake clock") {
  OutboxPolicy p;
  p.retrySchedule = {seconds(30), seconds(60), seconds(300)};
  p.maxAge = seconds(3600);
  p.maxBacklog = 10;
  p.maxInFlight = 8;
  const int64_t created = 1000;
  int64_t now = created;
  auto d1 = afterFailure(created, 1, now, p);
  CHECK_FALSE(d1.drop);
  CHECK(d1.nextAt == now + 30);
  now = d1.nextAt;
  auto d2 = afterFailure(created, 2, now, p);
  CHECK(d2.nextAt == now + 60);
  now = d2.nextAt;
  auto d3 = afterFailure(created, 3, now, p);
  CHECK(d3.nextAt == now + 300);
  // The last step repeats.
  auto d9 = afterFailure(created, 9, now, p);
  CHECK(d9.nextAt == now + 300);
  // Past max_age: dropped.
  now = created + 3400;
  CHECK(afterFailure(created, 9, now, p).drop);
  CHECK_FALSE(afterFailure(created, 1, now, p).drop);  // 3430 <= 3600
  CHECK_FALSE(expired(created, created + 3600, p));
  CHECK(expired(created, created + 3601, p));

  CHECK(claimCount(0, p) == 8);
  CHECK(claimCount(5, p) == 3);
  CHECK(claimCount(8, p) == 0);
  CHECK(claimCount(9, p) == 0);
  CHECK(delivered(200));
  CHECK(delivered(204));
  CHECK(delivered(299));
  CHECK_FALSE(delivered(301));
  CHECK_FALSE(delivered(404));
  CHECK_FALSE(delivered(500));
  CHECK_FALSE(delivered(0));
  CHECK(overBacklog(10, p) == 0);
  CHECK(overBacklog(15, p) == 5);
}

TEST_CASE("urlHost") {
  CHECK(urlHost("https://Hooks.Example.com/x") == "hooks.example.com");
  CHECK(urlHost("https://hooks.example.com:8443/x?y") == "hooks.example.com");
  CHECK(urlHost("https://127.0.0.1:9000/") == "127.0.0.1");
  CHECK(urlHost("https://[::1]:9000/h") == "::1");
  CHECK(urlHost("http://a/") == "");
}

// --- the outbox in the queue store -----------------------------------------------------

namespace {

std::unique_ptr<queue::SqliteStore> memoryStore() {
  auto s = queue::SqliteStore::open(":memory:");
  REQUIRE(s.ok());
  return std::move(s.value());
}

queue::NewMessage message(const std::string& id, const std::string& account, std::vector<std::string> rcpts) {
  queue::NewMessage m;
  m.id = id;
  m.account = account;
  m.mailFrom = "app@shop.example";
  m.recipients = std::move(rcpts);
  m.content = "Subject: t\r\n\r\nhello\r\n";
  m.receivedAt = 5000;
  return m;
}

std::vector<queue::WebhookEventRow> allEvents(queue::SqliteStore& s) {
  auto r = s.claimWebhookEvents(int64_t{1} << 40, 1000, 0);
  REQUIRE(r.ok());
  return r.value();
}

queue::AttemptRecord attempt(const std::string& id, int64_t index, queue::RecipientState st, int code,
                             const std::string& reply, const std::string& result) {
  queue::AttemptRecord rec;
  rec.messageId = id;
  rec.index = index;
  rec.attempt.at = 6000;
  rec.attempt.mx = "mx.example.org";
  rec.attempt.code = code;
  rec.attempt.reply = reply;
  rec.attempt.result = result;
  rec.newState = st;
  rec.nextAttempt = st == queue::RecipientState::Deferred ? 7000 : 0;
  rec.lastError = st == queue::RecipientState::Delivered ? "" : reply;
  if (code >= 400) rec.lastStatus = queue::EnhancedStatus{code / 100, 1, 1};
  return rec;
}

const std::set<std::string> kAll = {"accepted", "delivered", "deferred", "bounced", "suppressed", "expired"};

}  // namespace

TEST_CASE("outbox: accepted events with the message, none for repeats, DSNs or other accounts") {
  auto s = memoryStore();
  s->setWebhookEvents({{"shop", kAll}, {"ci", {"bounced"}}});

  auto m = message("Q1", "shop", {"a@example.org", "b@example.org"});
  m.idempotencyKey = "k1";
  m.idempotencyWindow = 3600;
  auto r = s->insertBatch({m});
  REQUIRE(r[0].ok());
  auto ev = allEvents(*s);
  REQUIRE(ev.size() == 2);
  std::set<std::string> rcpts;
  for (const auto& e : ev) {
    CHECK(e.account == "shop");
    CHECK(e.type == "accepted");
    const Json j = Json::parse(e.body);
    CHECK(j["id"] == e.eventId);
    CHECK(j["message_id"] == "Q1");
    CHECK(j["sender"] == "app@shop.example");
    rcpts.insert(j["recipient"].get<std::string>());
  }
  CHECK(rcpts == std::set<std::string>{"a@example.org", "b@example.org"});
  for (const auto& e : ev) REQUIRE(s->deleteWebhookEvent(e.seq).ok());

  // The same idempotency key: nothing stored, no event.
  auto again = message("Q2", "shop", {"a@example.org"});
  again.idempotencyKey = "k1";
  again.idempotencyWindow = 3600;
  auto r2 = s->insertBatch({again});
  REQUIRE(r2[0].ok());
  CHECK(r2[0].value() == "Q1");
  CHECK(allEvents(*s).empty());

  // Our own DSN: no event. An account without "accepted" or without a webhook: none.
  auto dsn = message("Q3", "shop", {"app@shop.example"});
  dsn.isDsn = true;
  REQUIRE(s->insertBatch({dsn, message("Q4", "ci", {"x@example.org"}), message("Q5", "other", {"y@example.org"})})[0].ok());
  CHECK(allEvents(*s).empty());

  // A message whose insert fails (duplicate id) leaves no event behind.
  auto r3 = s->insertBatch({message("Q1", "shop", {"z@example.org"})});
  CHECK_FALSE(r3[0].ok());
  CHECK(allEvents(*s).empty());
}

TEST_CASE("outbox: delivery results and operator bounces write their events") {
  auto s = memoryStore();
  s->setWebhookEvents({{"shop", kAll}});
  auto m = message("Q1", "shop", {"a@example.org", "b@example.org", "c@example.org", "d@example.org"});
  REQUIRE(s->insertBatch({m})[0].ok());
  auto dsn = message("D1", "shop", {"app@shop.example"});
  dsn.isDsn = true;
  REQUIRE(s->insertBatch({dsn})[0].ok());
  for (const auto& e : allEvents(*s)) REQUIRE(s->deleteWebhookEvent(e.seq).ok());

  auto leased = s->leaseDue(6000, 10);
  REQUIRE(leased.ok());
  using St = queue::RecipientState;
  REQUIRE(s->recordAttempts({attempt("Q1", 0, St::Delivered, 250, "250 2.0.0 Ok", "delivered"),
                             attempt("Q1", 1, St::Deferred, 451, "451 4.1.1 try later", "deferred"),
                             attempt("Q1", 2, St::Failed, 550, "550 5.1.1 no such user", "failed"),
                             attempt("D1", 0, St::Failed, 550, "550 5.1.1 no such user", "failed")})
              .ok());
  auto ev = allEvents(*s);
  REQUIRE(ev.size() == 3);  // none for the DSN
  std::map<std::string, Json> byType;
  for (const auto& e : ev) byType[e.type] = Json::parse(e.body);
  REQUIRE(byType.count("delivered"));
  REQUIRE(byType.count("deferred"));
  REQUIRE(byType.count("bounced"));
  CHECK(byType["delivered"]["recipient"] == "a@example.org");
  CHECK(byType["delivered"]["attempt"] == 1);
  CHECK(byType["delivered"]["smtp"]["code"] == 250);
  CHECK(byType["delivered"]["smtp"]["remote_host"] == "mx.example.org");
  CHECK(byType["deferred"]["smtp"]["code"] == 451);
  CHECK(byType["bounced"]["recipient"] == "c@example.org");
  CHECK(byType["bounced"]["smtp"]["enhanced_code"] == "5.1.1");
  for (const auto& e : ev) REQUIRE(s->deleteWebhookEvent(e.seq).ok());

  // Expiry of the deferred one; an operator's bounce of the one never attempted.
  // As the scheduler records expiry: result "failed", status 4.4.7.
  auto expiry = attempt("Q1", 1, St::Failed, 451, "expired after 1 hours in the queue", "failed");
  expiry.lastStatus = queue::EnhancedStatus{4, 4, 7};
  REQUIRE(s->recordAttempts({expiry}).ok());
  auto ex = allEvents(*s);
  REQUIRE(ex.size() == 1);
  CHECK(ex[0].type == "expired");
  CHECK(Json::parse(ex[0].body)["smtp"]["enhanced_code"] == "4.4.7");
  REQUIRE(s->deleteWebhookEvent(ex[0].seq).ok());
  REQUIRE(s->releaseLeases("Q1", {3}).ok());
  auto b = s->bounce("Q1");
  REQUIRE(b.ok());
  CHECK(b.value() == 1);
  auto ob = allEvents(*s);
  REQUIRE(ob.size() == 1);
  CHECK(ob[0].type == "bounced");
  CHECK(Json::parse(ob[0].body)["recipient"] == "d@example.org");
  CHECK(Json::parse(ob[0].body)["reason"] == "bounced by operator");
}

TEST_CASE("outbox: a bounce waiting for a lease of a dead process gets its event at clearLeases") {
  auto s = memoryStore();
  s->setWebhookEvents({{"shop", kAll}});
  REQUIRE(s->insertBatch({message("Q1", "shop", {"a@example.org"})})[0].ok());
  for (const auto& e : allEvents(*s)) REQUIRE(s->deleteWebhookEvent(e.seq).ok());
  REQUIRE(s->leaseDue(6000, 10).ok());
  REQUIRE(s->bounce("Q1").ok());  // in flight: a request, no event yet
  CHECK(allEvents(*s).empty());
  REQUIRE(s->clearLeases().ok());  // the next start: the request is applied
  auto ev = allEvents(*s);
  REQUIRE(ev.size() == 1);
  CHECK(ev[0].type == "bounced");
  CHECK(Json::parse(ev[0].body)["reason"] == "bounced by operator");
}

TEST_CASE("outbox: filtered event lists, suppression hook, claims, retries, backlog") {
  auto s = memoryStore();
  s->setWebhookEvents({{"shop", {"bounced", "suppressed"}}});
  REQUIRE(s->insertBatch({message("Q1", "shop", {"a@example.org"})})[0].ok());
  CHECK(allEvents(*s).empty());  // "accepted" not wanted
  CHECK(s->enqueueSuppressedLocked("shop", "Q9", "app@shop.example", "x@example.org", "on the suppression list", 7000) == "");
  CHECK(s->enqueueSuppressedLocked("other", "Q9", "app@shop.example", "x@example.org", "on the list", 7000) == "");
  auto sup = allEvents(*s);
  REQUIRE(sup.size() == 1);
  CHECK(sup[0].type == "suppressed");
  CHECK(Json::parse(sup[0].body)["reason"] == "on the suppression list");
  REQUIRE(s->deleteWebhookEvent(sup[0].seq).ok());

  // Claims: a claimed event is not claimed again until its claim ends or is cleared.
  for (int i = 0; i < 5; ++i)
    REQUIRE(s->enqueueWebhookEvent("shop", "evt_" + std::to_string(i), "delivered", "{}", 100 + i).ok());
  auto c1 = s->claimWebhookEvents(200, 3, 260);
  REQUIRE(c1.ok());
  REQUIRE(c1.value().size() == 3);
  CHECK(c1.value()[0].eventId == "evt_0");
  auto c2 = s->claimWebhookEvents(200, 10, 260);
  REQUIRE(c2.value().size() == 2);
  CHECK(s->claimWebhookEvents(200, 10, 260).value().empty());
  CHECK(s->claimWebhookEvents(261, 10, 300).value().size() == 5);  // claims ended
  REQUIRE(s->clearWebhookClaims().ok());
  // Reschedule: not due before next_at.
  REQUIRE(s->rescheduleWebhookEvent(c1.value()[0].seq, 1, 500, "HTTP status 503").ok());
  auto due = s->claimWebhookEvents(400, 10, 450).value();
  CHECK(due.size() == 4);
  REQUIRE(s->clearWebhookClaims().ok());
  auto later = s->claimWebhookEvents(500, 10, 550).value();
  REQUIRE(later.size() == 5);
  REQUIRE(s->clearWebhookClaims().ok());

  auto bl = s->webhookBacklog();
  REQUIRE(bl.ok());
  REQUIRE(bl.value().size() == 1);
  CHECK(bl.value()[0].account == "shop");
  CHECK(bl.value()[0].events == 5);
  CHECK(bl.value()[0].failing == 1);
  CHECK(bl.value()[0].oldestCreatedAt == 100);
  CHECK(bl.value()[0].lastError == "HTTP status 503");

  // The bound keeps the newest.
  auto t = s->trimWebhookBacklog("shop", 2);
  REQUIRE(t.ok());
  CHECK(t.value() == 3);
  auto left = allEvents(*s);
  REQUIRE(left.size() == 2);
  std::set<std::string> ids{left[0].eventId, left[1].eventId};
  CHECK(ids == std::set<std::string>{"evt_3", "evt_4"});
  CHECK(s->trimWebhookBacklog("shop", 2).value() == 0);
}

TEST_CASE("outbox: a hard bounce that suppresses its recipient writes bounced then suppressed, in its transaction") {
  auto s = memoryStore();
  s->setWebhookEvents({{"shop", kAll}});
  REQUIRE(s->insertBatch({message("Q1", "shop", {"gone@example.org", "full@example.org"})})[0].ok());
  for (const auto& e : allEvents(*s)) REQUIRE(s->deleteWebhookEvent(e.seq).ok());
  REQUIRE(s->leaseDue(6000, 10).ok());
  using St = queue::RecipientState;
  auto hard = attempt("Q1", 0, St::Failed, 550, "550 5.1.1 no such user", "failed");
  queue::SuppressionRow row;
  row.account = "shop";
  row.address = "gone@example.org";
  row.reason = "550 5.1.1 no such user";
  row.createdAt = 6000;
  hard.suppress = row;
  // Not a hard bounce (mailbox full): bounced, not suppressed.
  auto full = attempt("Q1", 1, St::Failed, 552, "552 5.2.2 mailbox full", "failed");
  REQUIRE(s->recordAttempts({hard, full}).ok());
  auto ev = allEvents(*s);
  REQUIRE(ev.size() == 3);
  CHECK(ev[0].type == "bounced");
  CHECK(ev[1].type == "suppressed");
  CHECK(ev[2].type == "bounced");
  Json sup = Json::parse(ev[1].body);
  CHECK(sup["recipient"] == "gone@example.org");
  CHECK(sup["sender"] == "app@shop.example");
  CHECK(sup["message_id"] == "Q1");
  CHECK(sup["reason"] == "550 5.1.1 no such user");
  REQUIRE(s->listSuppressions("shop").value().size() == 1);

  // An account that does not want "suppressed" still gets its list entry, not the event.
  auto s2 = memoryStore();
  s2->setWebhookEvents({{"shop", {"bounced"}}});
  REQUIRE(s2->insertBatch({message("Q2", "shop", {"gone@example.org"})})[0].ok());
  REQUIRE(s2->leaseDue(6000, 10).ok());
  auto hard2 = hard;
  hard2.messageId = "Q2";
  REQUIRE(s2->recordAttempts({hard2}).ok());
  auto ev2 = allEvents(*s2);
  REQUIRE(ev2.size() == 1);
  CHECK(ev2[0].type == "bounced");
  CHECK(s2->listSuppressions("shop").value().size() == 1);
}

TEST_CASE("outbox: a capture-mode simulated bounce writes accepted, bounced, suppressed") {
  auto s = memoryStore();
  s->setWebhookEvents({{"shop", kAll}});
  auto m = message("Q1", "shop", {"subrelay-bounce@example.org"});
  m.captured = true;
  queue::SimulatedBounce b;
  b.index = 0;
  b.code = 550;
  b.status = queue::EnhancedStatus{5, 1, 1};
  b.reply = "550 5.1.1 simulated hard bounce";
  queue::SuppressionRow row;
  row.account = "shop";
  row.address = "subrelay-bounce@example.org";
  row.reason = b.reply;
  row.createdAt = m.receivedAt;
  b.suppress = row;
  m.simulatedBounces = {b};
  REQUIRE(s->insertBatch({m})[0].ok());
  auto ev = allEvents(*s);
  REQUIRE(ev.size() == 3);
  CHECK(ev[0].type == "accepted");
  CHECK(ev[1].type == "bounced");
  CHECK(Json::parse(ev[1].body)["smtp"]["enhanced_code"] == "5.1.1");
  CHECK(ev[2].type == "suppressed");
}

TEST_CASE("outbox: the dispatcher's results are written with its next claim, in one transaction") {
  auto s = memoryStore();
  for (int i = 0; i < 4; ++i)
    REQUIRE(s->enqueueWebhookEvent("shop", "evt_" + std::to_string(i), "delivered", "{}", 100).ok());
  auto first = s->claimWebhookEvents(200, 2, 300).value();
  REQUIRE(first.size() == 2);
  // evt_0 was POSTed, evt_1 failed: both settled by the claim that takes evt_2 and evt_3.
  std::vector<queue::WebhookSettle> settle = {{first[0].seq, true, 0, 0, {}},
                                              {first[1].seq, false, 1, 500, "HTTP status 503"}};
  auto second = s->claimWebhookEvents(201, 8, 300, settle).value();
  REQUIRE(second.size() == 2);  // evt_1 is not due before 500
  CHECK(second[0].eventId == "evt_2");
  CHECK(second[1].eventId == "evt_3");
  // Only results, no claim (a stopping dispatcher): max 0.
  CHECK(s->claimWebhookEvents(202, 0, 0, {{second[0].seq, true, 0, 0, {}}, {second[1].seq, true, 0, 0, {}}})
            .value()
            .empty());
  auto left = allEvents(*s);
  REQUIRE(left.size() == 1);
  CHECK(left[0].eventId == "evt_1");
  CHECK(left[0].attempts == 1);
  CHECK(left[0].nextAt == 500);
  CHECK(left[0].lastError == "HTTP status 503");
}
