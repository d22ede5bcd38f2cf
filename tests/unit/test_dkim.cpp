// dkim/: canonicalisation (RFC 6376 3.4, example 3.4.5), the streaming body hash (3.7)
// against the one-shot canonicaliser in every chunk split, key loading and sizes
// (RFC 8301), the RFC 8463 Appendix A signed message (both signatures verify, and our
// Ed25519 signRaw reproduces its deterministic b=), and sign-then-verify round trips
// with a small independent verifier below (5.4.2 bottom-up selection, b= removal per
// 3.7). Self-contained: no DNS, no external verifier.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "dkim/dkim.h"
#include "util/base64.h"
#include "util/strings.h"

using namespace subrelay;
using namespace subrelay::dkim;

namespace {

// ---- key material ----------------------------------------------------------------------
// RFC 8463 A.1: the RSA key of the example (1024 bits, so it must be refused for signing).
const char kRfc8463RsaPem[] =
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIICXQIBAAKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQi\n"
    "Y/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqM\n"
    "KrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB\n"
    "AoGAH0cxOhFZDgzXWhDhnAJDw5s4roOXN4OhjiXa8W7Y3rhX3FJqmJSPuC8N9vQm\n"
    "6SVbaLAE4SG5mLMueHlh4KXffEpuLEiNp9Ss3O4YfLiQpbRqE7Tm5SxKjvvQoZZe\n"
    "zHorimOaChRL2it47iuWxzxSiRMv4c+j70GiWdxXnxe4UoECQQDzJB/0U58W7RZy\n"
    "6enGVj2kWF732CoWFZWzi1FicudrBFoy63QwcowpoCazKtvZGMNlPWnC7x/6o8Gc\n"
    "uSe0ga2xAkEA8C7PipPm1/1fTRQvj1o/dDmZp243044ZNyxjg+/OPN0oWCbXIGxy\n"
    "WvmZbXriOWoSALJTjExEgraHEgnXssuk7QJBALl5ICsYMu6hMxO73gnfNayNgPxd\n"
    "WFV6Z7ULnKyV7HSVYF0hgYOHjeYe9gaMtiJYoo0zGN+L3AAtNP9huqkWlzECQE1a\n"
    "licIeVlo1e+qJ6Mgqr0Q7Aa7falZ448ccbSFYEPD6oFxiOl9Y9se9iYHZKKfIcst\n"
    "o7DUw1/hz2Ck4N5JrgUCQQCyKveNvjzkkd8HjYs0SwM0fPjK16//5qDZ2UiDGnOe\n"
    "uEzxBDAr518Z8VFbR41in3W4Y3yCDgQlLlcETrS+zYcL\n"
    "-----END RSA PRIVATE KEY-----\n";
const char kRfc8463RsaTxt[] =
    "v=DKIM1; k=rsa; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWR"
    "iGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/J16JYi0Qvx/byYzCNb3W91y3FutAC"
    "DfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLzBfO2EeC3"
    "Ip3G+2kryOTIKT+l/K4w3QIDAQAB";
// RFC 8463 A.1 Ed25519 secret key (RFC 8032 7.1 test 1) wrapped in PKCS#8 (RFC 8410 7):
// 302e020100300506032b657004220420 || 9d61b19d...ae7f60.
const char kRfc8463Ed25519Pem[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n"
    "-----END PRIVATE KEY-----\n";
const char kRfc8463Ed25519Txt[] = "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

// `openssl genrsa -traditional 2048`
const char kTraditionalRsa2048[] = R"(-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEA2kK1Q6AefO8aEKmVMvlqKgODsWxKUPNFhS5+eUfivsLpb/t2
/zLK1By6CWAyQOQ3qZQQ/VOIEiUY+pkWeV8g8WVZ64ywQDImZLo88F/9wsgrqNew
pGxYUwRCYyh6mOpt/+T8SfbOnkucLa3WQ5qG216laEsCrc3kFpTurt81i3hvgH2n
5ds7SJtPDfIAtl6qwbw9UHKgtFFwEnzLSES7CmHxYMRIKsjSDt2M4yWpbLJ0dDqk
wX4kk3ZY34m87E40aV/oRTRbQB16wjBZB/8elCHUWaSnWwrNRho/tHyoV5Rmp+Tv
K3cb+Syzgu4qedctetTlbQhPazpUmsPCLpSQrQIDAQABAoIBAB/e20yhaipImMgD
l01+9ZVmd3m2LCDncQiaSi4IBPBhkkg/kjgAEPWJr1G0qgnnOUiKHjP7mVQ69guL
xKga77rIF6oJXGg3WntdZY4dGjcx1ww72KedyYTvy4jirYo8Oy1BYOSlBTVAqbDS
4EV1YElSp/kTcPPzq2FvxG2lGtK/UV4yzMSqSYUle+FnC2ixofxbfNRvzaahvrF0
02b6Gx+WqK4PchHt8S8mun3fkP8eFVMph/EzU4F3iN7Pu1zbslwGB9a+Rem2oUAM
1YexUFrgRbSE5ZSVg6QT2YSNjeYth9pwip7oK4uMHHyHmQxkapMMBVCXaWUVHfpr
oqZbkgECgYEA/z4qMGjtB/KyJz2wGrfhyfGfooi2+qp+b27dBNyIkS/URXzPMkbp
Aw02pwkeEpKloKvgZRW4E1Rpg0R07YFIGtH5gaCjuMzeTs7rRzAdA2tUrfk6jRVN
WUN9jtnXTROOpwjzi9jCsH1KvnQO4fjrIent6mOSC3vQTPxF9JoEGgECgYEA2uh1
WQUEjzM9zTDj/M5olTAwQvV10Be19KSFD7QkmLfGuxKMKHcf5Om5vXYxicrYw8dr
jA8Q6vARHLoyVPn8biwLbmnRHsn8ULipsq7HIhbog5NrTAy+nhSP7ZaK8POBAmmB
BpDEEglItqapXVRZZbYHsa0Xbv9q6TIRFdQC/q0CgYAo3s1mnwaFZUk9m1UdkiAn
c/c50WZrUO2Z7kiZxK5hgSUeU1PiGxSolm8P5BfapXy784mk5gtpnPSgPk/yz+a5
1LF9HjnZF4TpXZyy83NR3tfaW7QSbzzJdFMgkqU1BFKtUHOfCwBxvj4/rNnNOUx9
S7X6+CKkkBjUmvigqCDMAQKBgE4iasA7akUypPx4VugFRI77hD5iHosH64pGrrfM
NMPN1MEw/ZXz7w5l3kYhyczE+lnm9BwpxIAW8ASw8QYjtFYeonXmjx3OOqEVSHze
pXUleBh+pe2fHuqNrFHBShZ207VoswUE5vcJGUsYcZs+YCpNrrFcduDHigFyPWbt
JaSBAoGAUsOEKYVc2EolL2igZHxFvu7YITi6Pl5nNcGVsTyxrd3Zz3BWYCbGhch/
t3XbqYz9kX7mr+b22sVfwIbm4l+tPBomTIcSEbD1EFFy/s7tzIiXNhnNqbuL74ai
MrMuRbd6WMXPMenDfMJXXLKpKAD7pVUnzSoVtPDbkKd1nYLU+/8=
-----END RSA PRIVATE KEY-----
)";
// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`
const char kEcP256[] = R"(-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg2roQdkG42iFJj3Qc
7QjmTArCO6W6Iw42Qyq7yvqUwC6hRANCAATp/5DDprm+cAHcH+icmp5SBgtnGbEm
CVjnS6nRb+pZbWvtfK1t2XtwH13Z6TQ+uTdol9cLUkd7rRpobci3SM7s
-----END PRIVATE KEY-----
)";
// `openssl genrsa 4104`: just over the RFC 8301 ceiling.
const char kRsa4104[] = R"(-----BEGIN PRIVATE KEY-----
MIIJRgIBADANBgkqhkiG9w0BAQEFAASCCTAwggksAgEAAoICAgDKqrbJx9R5+We9
hI9RQk2GVgLY8EnrCBLO6jIWgym7XtJVrBxTfAC+VxM+hz4yE6CqsCE2TOAMctI7
9fWwOoQVQQ2lw//PtDZOUhNwuMIV0LOhg7gOSD7E2FNVR0WId+1k39zrQ9NjP+hc
U0aKQWGKWb4Eiiyxn3pHDthpJSDvhcIJsqKphhFoAb6TMR7RCRqbt7xFRaeg7jCo
PnRE0jPOdiA4AtGRzL6jiWTDIfuuqDES2eeeUcH8aL9MNweryJLu9TY6VluGBtE8
CxSy2OTZxepNqC0h0i5EBv5858pFMCTI9/sMj+JCUGqsQfncVbugQz6K3rKIBQU2
M9k75PzghiZnZs2z6OJ8vvvxscnG9KlEG3kT5jlzCR0JP9jcue8dX/MfP+DLHYik
aPRNWyE21qq/MQa7wfdl7qL27zLRYhETKyarobZTjOnH61XMbLVtTsituflYVUYv
/tFIZeQjSL28Rywq8UYlqj30dEz7aKW+Zd1Qi+vc8nozWgO7hQ1DaYoEwCvAPT0/
y8VSPqkIVMwkjkPkDfQJ0ow3GJVFHJMXr3smR9rYzV+S87AfPNfjp7Hw2H35aZCh
pdjdlAtBrzF1PjQtz0RyjDMiZtUL3wk1Ucldda/b+3Dm5WrT2xdFZEiwbDzg+K/p
Q1jIIT6Elh/N+7jk19OLfOHQxX1CO30CAwEAAQKCAgFW8DOYTJ4zss8TR/W47IHY
IjZ3fGChL6Xt2B4jdSGmTI9bDAlcsMGa5TyOorKGBdBy2DpvEjw8atcPvLun3PpD
KdRiazlmDs8K+v925/LuK8ia/SesDMbMZ2YcG4ZS++s8ziF1VPOtzEDvthN5BIIE
uOmgBewVSC3KpK4mMLS3uz/ZLCXGJgp6fOEVQEmRb1/YM9HSP4agrPz3d08mJKvv
odHBZUgkTNnsymgMoxvVuTXP+eT3j+fw0LhbR/IE+XY6hrs7/EansG36XWCENjG5
z8JqjL3Ll9+b9AogZ8hntLba9THfGiv7uYaBHY5DPA3QOnhuVwjr+4dYUJacMGdg
F0LRmOqoP4vYqg/QVFQjHSJMzCma36B+5zSF1MEbXf3rtj8fY2CR7iHDn5JrVmCG
j0Lc7+jCjmV4diVvCY7eaJOGYY0nftUckqxOBPi+tXoxrCqJgSfVrLKrJDOzLTKq
B0W9VEva+vKBuj/DneV2oTPxzDV9eJgkPNUx5cNenBdWEIeWSTCZ7gvpAxW9bPOq
QqdRfg9WpcwgavoI1PcEyHSvka4ELWhCVdRYemUkBUXLjCO/HAqsDqKcSXmTDyPf
iu+dbanpJ3uZaSksmEiUz/tMbLC6VFIk2M8vQAcf3AszRRqsQFz6+Rcu5GXonvEj
AzoZqRjcQBsaqyF0AApp+DsCggEBDs+rvMrBAqoq1oz9NXcORyxEjV+tvxbg4+UN
iA38B1OtWuDnVW9eKAdXhjgVsGldj1hrz20CblHtMsQQ9+9ZUI6Kwpik5tIIqHaP
zzjnONhxIL5mcn7s3aJ6dTVy0FTFQrQT7oA35m0CyNTKUnAYY+9QZwJ/PrkVxOBq
zRC/KEtvxancXFtGpSZWXnyqJwyOU0tznWIfBOr1d6qGF3RX08DXDcJcY/sxc4iW
2Lm6bmiA43An6/xQ2niAt4dXjeAUx59P7RXK8t4hwTUy14L1FwCH1xYBOW5xfHSZ
znIlePHStXxiwyLgjNSnQ6nUGokt140jzJVaPfk8iUvlsSPymH8CggEBDa7vPhqP
HU9jUJZhVQ8AQc6D62B5pFx3WWx6jVh/MLjOlDfXzEjYwzA7egMMgtcE22c2g08U
CMEYhiDcL6hTp3saT/IWJ9frHjXPvVAiAWmhLSHX00KvEKXrNYtJDZdsif58/PNK
vS3cZe4A2oMxZ8oHu/8MaqVdPo1TCequrOF+623C7vjx/Kzb4JXm+eSl/BRTFSAH
mTiXpeyUTplLzxfiqgVoSMEjMg8OcB2a0IWkcsrht3rgzuJp0sBf2++Wx/jI4BVg
o9qfTCeJ3EhSbeb5DLVhstCv+riuCe7Oi0b8o8DJILOVgfyvloxIPBuahEQ6KTcZ
CoIfudbTAzUsjgMCggEBBAipVFTANnKUEjT57WrMd7Plw78wOeAIReknQ0vTvUcb
6qlgN9OKCErfmo2B0rcPpS/GxQqCY/tqJ65glLYaVCdOQWuDVd4UP5Vy21Q7HS9N
uEZC7qIE7uQGiA+Tgovj4aPb3dQL5XUBEiNqKwOekPEnq7ZxY2rTM/iO/eS2u0m4
WlRF0N2HIwmK8lbvnIz94k+lYFLN8e/wBLRrqs2j8ecOaw/pS82pDTdBJiuHS/So
TclJBiuE9ctl+xYgUWKbJjcMdJy/1l+LP+y2OR3QlIAvfvPeR37955B2J1TNQeBS
q90BpPXFxHVSTMpfGw8Lbi5hdqGin0hXJWmHWDRbKQ8CggEBCq0LctwL/2Vaapz6
EgBjRfTYDoS2Q9v1LqsprzB2BFCctR4g2/2WSixOq3LHhyo2WuzbpnXDftURykzH
HtPpeQneTLPoP2wCwQ5hKCbmcU21+F2oY+dqacXaj2s+M0GK6NvLLxyvmoy2ojyh
I9wqZv1FLZPgXzDoYI6pVFprsO07NnrsFcHcJDXGVCMBFMYmD1jYPepAo3Z5M3cz
e2O1tz2+lsMjS2iNilge/rDKgplS5lGO7LYNwrz6rfl0kUgMz7c3G0byoMVJdoR+
1oUC80a72AOI15hlRWxkNdHCCv72zNj00/Pp2YKKiR6omWU8GKiW7GNVwVInaLrI
5n7NZXsCggEBDoiJ3PdiAJYwq/G+rBcqZgCLyDm+dqJSK8ERS291C2ahafAJg2OY
T5VvSQvdBuFBJIqDiow8cq7BUoGckSAzaB1Jke4l7avJixQOTqbXPrZfcj96XCZs
YsZQHMLbp8iCtB6AsAhxWztgijwRl9BvQ9dO3EzuRSLQT2zV59V9FUpi3nC/vPeF
RpEgwGim5Y8Tb8R/akkiy6E2jEiY4H0C6BhlPTZAq/8TVnBOFEu+iMSbPtDyFVKG
RzyYWMxE0B6DIWI5P8AgUQyVV32d6b4nQBJ3O1gReqHUAYuDFo1ZUvko6lUH5jfy
FXjqcdwq1Uhe7XVOKZShw9cjy+hMYVb/E4M=
-----END PRIVATE KEY-----
)";

std::shared_ptr<const PrivateKey> rsaKey() {
  static auto k = [] {
    auto r = generateKey(Algorithm::RsaSha256, 2048);
    REQUIRE(r.ok());
    return *r;
  }();
  return k;
}

std::shared_ptr<const PrivateKey> edKey() {
  static auto k = [] {
    auto r = generateKey(Algorithm::Ed25519Sha256);
    REQUIRE(r.ok());
    return *r;
  }();
  return k;
}

// ---- a small independent verifier ------------------------------------------------------

struct Msg {
  std::vector<std::string> fields;  // raw, with folding and CRLF
  std::string body;
};

Msg splitMessage(std::string_view m) {
  Msg out;
  size_t pos = 0;
  while (pos < m.size()) {
    size_t e = m.find("\r\n", pos);
    if (e == pos) {
      out.body = std::string(m.substr(pos + 2));
      return out;
    }
    size_t end = e == std::string_view::npos ? m.size() : e + 2;
    std::string line(m.substr(pos, end - pos));
    if ((line[0] == ' ' || line[0] == '\t') && !out.fields.empty()) {
      out.fields.back() += line;
    } else {
      out.fields.push_back(line);
    }
    pos = end;
  }
  return out;
}

std::string fieldName(const std::string& f) { return util::toLower(util::trim(f.substr(0, f.find(':')))); }

std::string stripWs(std::string_view s) {
  std::string r;
  for (char c : s) {
    if (c != ' ' && c != '\t' && c != '\r' && c != '\n') r += c;
  }
  return r;
}

std::string tagValue(const std::string& field, std::string_view tag) {
  std::string value = field.substr(field.find(':') + 1);
  for (auto t : util::split(value, ';')) {
    size_t eq = t.find('=');
    if (eq == std::string_view::npos) continue;
    if (stripWs(t.substr(0, eq)) == tag) return stripWs(t.substr(eq + 1));
  }
  return {};
}

// The field with the b= value (and the whitespace around it) emptied, RFC 6376 3.7.
std::string withEmptyB(const std::string& field) {
  size_t pos = field.find(':') + 1;
  while (pos < field.size()) {
    size_t p = pos;
    while (p < field.size() && (field[p] == ' ' || field[p] == '\t' || field[p] == '\r' || field[p] == '\n')) ++p;
    size_t semi = field.find(';', p);
    if (field.compare(p, 1, "b") == 0) {
      size_t q = p + 1;
      while (q < field.size() && (field[q] == ' ' || field[q] == '\t')) ++q;
      if (q < field.size() && field[q] == '=') {
        size_t valueEnd = semi == std::string::npos ? field.size() - 2 : semi;
        return field.substr(0, q + 1) + field.substr(valueEnd);
      }
    }
    if (semi == std::string::npos) break;
    pos = semi + 1;
  }
  return field;
}

// Verifies the `which`-th DKIM-Signature field of a signed message against a key
// record. Returns "ok" or what failed.
std::string verify(std::string_view signedMsg, std::string_view txt, int which = 0) {
  Msg m = splitMessage(signedMsg);
  std::string sig;
  int seen = 0;
  for (const auto& f : m.fields) {
    if (fieldName(f) == "dkim-signature" && seen++ == which) sig = f;
  }
  if (sig.empty()) return "no signature";
  std::string c = tagValue(sig, "c");
  Canon hc = c.rfind("simple", 0) == 0 ? Canon::Simple : Canon::Relaxed;
  Canon bc = c.find("/simple") != std::string::npos ? Canon::Simple : Canon::Relaxed;
  if (util::base64Encode(sha256(canonicalizeBody(m.body, bc))) != tagValue(sig, "bh")) return "body hash mismatch";
  // RFC 6376 5.4.2: instances are used bottom-up; extra names match nothing.
  std::vector<bool> used(m.fields.size(), false);
  std::string data;
  const std::string h = tagValue(sig, "h");  // split() returns views into it
  for (auto name : util::split(h, ':')) {
    std::string n = util::toLower(name);
    for (size_t i = m.fields.size(); i-- > 0;) {
      if (!used[i] && fieldName(m.fields[i]) == n) {
        used[i] = true;
        data += canonicalizeHeader(m.fields[i], hc);
        break;
      }
    }
  }
  std::string s = canonicalizeHeader(withEmptyB(sig), hc);
  data += s.substr(0, s.size() - 2);
  auto b = util::base64Decode(tagValue(sig, "b"));
  if (!b) return "b= not base64";
  bool ed = tagValue(sig, "a") == "ed25519-sha256";
  auto r = verifyRaw(txt, ed ? sha256(data) : data, *b);
  return r.ok() ? "ok" : r.error().message;
}

std::string bodyOf(std::string_view msg) {
  if (msg.substr(0, 2) == "\r\n") return std::string(msg.substr(2));
  size_t p = msg.find("\r\n\r\n");
  return p == std::string_view::npos ? std::string() : std::string(msg.substr(p + 4));
}

std::string unfold(std::string s) {
  std::string r;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') {
      ++i;
      continue;
    }
    r += s[i];
  }
  return r;
}

const std::string kMessage =
    "Received: from client (client [192.0.2.1]) by relay; Fri, 1 Mar 2024 10:00:00 +0000\r\n"
    "DKIM-Signature: v=1; a=rsa-sha256; d=foreign.example; s=x; h=from; bh=AAAA; b=BBBB\r\n"
    "From: Alice Example <alice@example.com>\r\n"
    "To: Bob <bob@example.net>,\r\n"
    "  Carol <carol@example.org>\r\n"
    "Subject: Quarterly   report\t(draft)\r\n"
    "Date: Fri, 1 Mar 2024 10:00:00 +0000\r\n"
    "Message-ID: <abc123@example.com>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "X-Mailer: test\r\n"
    "\r\n"
    "Hello Bob,\r\n"
    "\r\n"
    "the numbers  are \t in.  \r\n"
    "Caf\xc3\xa9 \xff\r\n"
    "\r\n"
    "\r\n";

SignOptions opts(Canon h = Canon::Relaxed, Canon b = Canon::Relaxed) {
  SignOptions o;
  o.headerCanon = h;
  o.bodyCanon = b;
  o.timestamp = 1709287200;
  return o;
}

std::string signOne(const std::string& msg, const std::shared_ptr<const PrivateKey>& key,
                    const SignOptions& o = opts()) {
  LocalSigner signer;
  auto r = signer.sign(msg, {SignerKey{"example.com", "sel", key}}, o);
  REQUIRE(r.ok());
  return *r;
}

std::string replace(std::string s, std::string_view from, std::string_view to) {
  size_t p = s.find(from);
  REQUIRE(p != std::string::npos);
  return s.replace(p, from.size(), to);
}

}  // namespace

// ---- canonicalisation ------------------------------------------------------------------

TEST_CASE("RFC 6376 3.4.5 example, relaxed and simple") {
  const std::string h1 = "A: X\r\n";
  const std::string h2 = "B : Y\t\r\n\tZ  \r\n";
  const std::string body = " C \r\nD \t E\r\n\r\n\r\n";
  CHECK(canonicalizeHeader(h1, Canon::Relaxed) == "a:X\r\n");
  CHECK(canonicalizeHeader(h2, Canon::Relaxed) == "b:Y Z\r\n");
  CHECK(canonicalizeBody(body, Canon::Relaxed) == " C\r\nD E\r\n");
  CHECK(canonicalizeHeader(h1, Canon::Simple) == h1);
  CHECK(canonicalizeHeader(h2, Canon::Simple) == h2);
  CHECK(canonicalizeBody(body, Canon::Simple) == " C \r\nD \t E\r\n");

  StreamingBodyHash h;
  h.update(h1 + h2 + "\r\n" + body);
  auto d = h.finish();
  CHECK(d.relaxed == sha256(" C\r\nD E\r\n"));
  CHECK(d.simple == sha256(" C \r\nD \t E\r\n"));
}

TEST_CASE("relaxed header edge cases") {
  CHECK(canonicalizeHeader("Subject:   hello   world  \r\n", Canon::Relaxed) == "subject:hello world\r\n");
  CHECK(canonicalizeHeader("Subject: a\r\n\tb\r\n   c \r\n", Canon::Relaxed) == "subject:a b c\r\n");
  CHECK(canonicalizeHeader("SUBJECT \t:\t x\r\n", Canon::Relaxed) == "subject:x\r\n");
  CHECK(canonicalizeHeader("X-Empty:\r\n", Canon::Relaxed) == "x-empty:\r\n");
  CHECK(canonicalizeHeader("X-Empty: \r\n  \r\n", Canon::Relaxed) == "x-empty:\r\n");
  CHECK(canonicalizeHeader("X-8bit: caf\xc3\xa9 \xff  \xfe\r\n", Canon::Relaxed) == "x-8bit:caf\xc3\xa9 \xff \xfe\r\n");
  CHECK(canonicalizeHeader("X-Colon: a:b : c\r\n", Canon::Relaxed) == "x-colon:a:b : c\r\n");
  // Only the name is lower-cased.
  CHECK(canonicalizeHeader("From: Alice <ALICE@Example.COM>\r\n", Canon::Relaxed) ==
        "from:Alice <ALICE@Example.COM>\r\n");
  CHECK(canonicalizeHeader("Subject: a\r\n\tb\r\n", Canon::Simple) == "Subject: a\r\n\tb\r\n");
}

TEST_CASE("body edge cases") {
  // RFC 6376 3.4.3: an empty body is CRLF for simple; 3.4.4: empty for relaxed.
  CHECK(canonicalizeBody("", Canon::Simple) == "\r\n");
  CHECK(canonicalizeBody("", Canon::Relaxed) == "");
  CHECK(canonicalizeBody("\r\n\r\n\r\n", Canon::Simple) == "\r\n");
  CHECK(canonicalizeBody("\r\n\r\n\r\n", Canon::Relaxed) == "");
  CHECK(canonicalizeBody("a\r\n\r\n\r\n", Canon::Simple) == "a\r\n");
  CHECK(canonicalizeBody("a\r\n\r\nb\r\n\r\n", Canon::Simple) == "a\r\n\r\nb\r\n");
  // No final CRLF: one is added (both).
  CHECK(canonicalizeBody("abc", Canon::Simple) == "abc\r\n");
  CHECK(canonicalizeBody("abc", Canon::Relaxed) == "abc\r\n");
  CHECK(canonicalizeBody("abc  ", Canon::Relaxed) == "abc\r\n");
  // WSP runs and trailing WSP.
  CHECK(canonicalizeBody("a  \t b \t\r\n", Canon::Relaxed) == "a b\r\n");
  CHECK(canonicalizeBody("  lead\r\n", Canon::Relaxed) == " lead\r\n");
  CHECK(canonicalizeBody("a  \t b \t\r\n", Canon::Simple) == "a  \t b \t\r\n");
  // Lines of WSP only are empty once their trailing WSP is gone.
  CHECK(canonicalizeBody("a\r\n \r\n\t\r\n", Canon::Relaxed) == "a\r\n");
  CHECK(canonicalizeBody("a\r\n \r\n\t\r\n", Canon::Simple) == "a\r\n \r\n\t\r\n");
  CHECK(canonicalizeBody("a\r\n  \r\nb\r\n", Canon::Relaxed) == "a\r\n\r\nb\r\n");
  // Bare CR and LF are line content, not line ends; 8-bit bytes pass through.
  CHECK(canonicalizeBody("a\nb\rc\r\n", Canon::Relaxed) == "a\nb\rc\r\n");
  CHECK(canonicalizeBody("a\r", Canon::Simple) == "a\r\r\n");
  CHECK(canonicalizeBody("\xff\xfe \xc3\xa9\r\n", Canon::Relaxed) == "\xff\xfe \xc3\xa9\r\n");
}

// ---- streaming body hash ---------------------------------------------------------------

TEST_CASE("StreamingBodyHash equals the one-shot canonicaliser in every split") {
  const std::vector<std::string> messages = {
      "A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n",
      "From: a\r\n\r\n",
      "From: a\r\n\r\nno final crlf",
      "From: a\r\n\r\n\r\n\r\n\r\n",
      "From: a\r\n\r\n \t \r\n\t\r\nx  \r\n \r\n",
      "From: a\r\n\r\nbare\rcr\r\r\nand\nlf\r\r",
      "\r\nbody only, empty header block\r\n",
      "From: headers only, no body\r\n",
      "From: a\r\n\r\n\xff\xfe \t\xc3\xa9  \r\n\r\n",
      "From: a\r\nX: b\r\n\r\n\r\n\r\nA\r\n\r\n\r\nB\r\n\r\n",
      "From: a\r\n\r\n\r\r\n\r\n",
      std::string(kMessage),
  };
  for (const auto& msg : messages) {
    CAPTURE(msg);
    const std::string body = bodyOf(msg);
    const std::string wantSimple = sha256(canonicalizeBody(body, Canon::Simple));
    const std::string wantRelaxed = sha256(canonicalizeBody(body, Canon::Relaxed));
    auto check = [&](const std::vector<size_t>& cuts) {
      StreamingBodyHash h;
      size_t prev = 0;
      for (size_t c : cuts) {
        h.update(std::string_view(msg).substr(prev, c - prev));
        prev = c;
      }
      h.update(std::string_view(msg).substr(prev));
      auto d = h.finish();
      CHECK(d.simple == wantSimple);
      CHECK(d.relaxed == wantRelaxed);
    };
    check({});
    // Every pair of cut points (which includes every single cut and empty chunks).
    if (msg.size() <= 80) {
      for (size_t i = 0; i <= msg.size(); ++i) {
        for (size_t j = i; j <= msg.size(); ++j) check({i, j});
      }
    } else {
      for (size_t i = 0; i <= msg.size(); ++i) check({i});
    }
    std::vector<size_t> every;
    for (size_t i = 1; i < msg.size(); ++i) every.push_back(i);
    check(every);  // one byte at a time
  }
}

TEST_CASE("StreamingBodyHash keeps many empty lines as a count") {
  std::string body(200000 * 2, '\0');
  for (size_t i = 0; i < body.size(); i += 2) {
    body[i] = '\r';
    body[i + 1] = '\n';
  }
  for (const std::string tail : {"", "x\r\n"}) {
    StreamingBodyHash h;
    h.update("From: a\r\n\r\n");
    for (size_t i = 0; i < body.size(); i += 4093) h.update(std::string_view(body).substr(i, 4093));
    h.update(tail);
    auto d = h.finish();
    CHECK(d.simple == sha256(canonicalizeBody(body + tail, Canon::Simple)));
    CHECK(d.relaxed == sha256(canonicalizeBody(body + tail, Canon::Relaxed)));
  }
}

TEST_CASE("StreamingBodyHash is movable") {
  StreamingBodyHash a;
  a.update("From: a\r\n\r\nhel");
  StreamingBodyHash b(std::move(a));
  b.update("lo\r\n");
  CHECK(b.finish().relaxed == sha256("hello\r\n"));
}

// ---- keys ------------------------------------------------------------------------------

TEST_CASE("algorithm names") {
  CHECK(algorithmName(Algorithm::RsaSha256) == "rsa-sha256");
  CHECK(algorithmName(Algorithm::Ed25519Sha256) == "ed25519-sha256");
  CHECK(parseAlgorithm("ed25519-sha256") == Algorithm::Ed25519Sha256);
  CHECK(parseAlgorithm("rsa-sha256") == Algorithm::RsaSha256);
  CHECK_FALSE(parseAlgorithm("rsa-sha1").has_value());
}

TEST_CASE("generated keys: PKCS#8 round trip and TXT records") {
  auto rsa = rsaKey();
  CHECK(rsa->algorithm() == Algorithm::RsaSha256);
  CHECK(rsa->bits() == 2048);
  std::string pem = rsa->pemPrivate();
  CHECK(pem.rfind("-----BEGIN PRIVATE KEY-----", 0) == 0);
  auto again = loadPrivateKeyPem(pem, Algorithm::RsaSha256);
  REQUIRE(again.ok());
  CHECK((*again)->txtRecord() == rsa->txtRecord());
  CHECK(rsa->txtRecord().rfind("v=DKIM1; k=rsa; p=MII", 0) == 0);

  auto ed = edKey();
  CHECK(ed->algorithm() == Algorithm::Ed25519Sha256);
  CHECK(ed->bits() == 256);
  std::string txt = ed->txtRecord();
  REQUIRE(txt.rfind("v=DKIM1; k=ed25519; p=", 0) == 0);
  auto raw = util::base64Decode(txt.substr(22));
  REQUIRE(raw.has_value());
  CHECK(raw->size() == 32);
  auto edAgain = loadPrivateKeyPem(ed->pemPrivate(), Algorithm::Ed25519Sha256);
  REQUIRE(edAgain.ok());
  CHECK((*edAgain)->txtRecord() == txt);

  for (const auto& k : {rsa, ed}) {
    auto sig = k->signRaw("data");
    REQUIRE(sig.ok());
    CHECK(verifyRaw(k->txtRecord(), "data", *sig).ok());
    CHECK_FALSE(verifyRaw(k->txtRecord(), "datA", *sig).ok());
  }
  CHECK_FALSE(verifyRaw(rsa->txtRecord(), "data", *ed->signRaw("data")).ok());
}

TEST_CASE("RFC 8463 Ed25519 key: TXT record of A.2") {
  auto k = loadPrivateKeyPem(kRfc8463Ed25519Pem, Algorithm::Ed25519Sha256);
  REQUIRE(k.ok());
  CHECK((*k)->txtRecord() == kRfc8463Ed25519Txt);
}

TEST_CASE("traditional RSA PEM loads") {
  auto k = loadPrivateKeyPem(kTraditionalRsa2048, Algorithm::RsaSha256);
  REQUIRE(k.ok());
  CHECK((*k)->bits() == 2048);
  auto sig = (*k)->signRaw("x");
  REQUIRE(sig.ok());
  CHECK(sig->size() == 256);
  CHECK(verifyRaw((*k)->txtRecord(), "x", *sig).ok());
}

TEST_CASE("key sizes and types are checked") {
  auto small = loadPrivateKeyPem(kRfc8463RsaPem, Algorithm::RsaSha256);
  REQUIRE_FALSE(small.ok());
  CHECK(small.error().message == "RSA key of 1024 bits: DKIM keys must be 2048 to 4096 bits (RFC 8301)");

  auto big = loadPrivateKeyPem(kRsa4104, Algorithm::RsaSha256);
  REQUIRE_FALSE(big.ok());
  CHECK(big.error().message == "RSA key of 4104 bits: DKIM keys must be 2048 to 4096 bits (RFC 8301)");

  auto edAsRsa = loadPrivateKeyPem(kRfc8463Ed25519Pem, Algorithm::RsaSha256);
  REQUIRE_FALSE(edAsRsa.ok());
  CHECK(edAsRsa.error().message.find("found an Ed25519 key") != std::string::npos);
  auto rsaAsEd = loadPrivateKeyPem(kTraditionalRsa2048, Algorithm::Ed25519Sha256);
  REQUIRE_FALSE(rsaAsEd.ok());
  CHECK(rsaAsEd.error().message.find("found an RSA key (2048 bits)") != std::string::npos);
  auto ec = loadPrivateKeyPem(kEcP256, Algorithm::RsaSha256);
  REQUIRE_FALSE(ec.ok());
  CHECK(ec.error().message.find("found an EC key") != std::string::npos);

  for (std::string_view junk : {"", "garbage", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}) {
    auto r = loadPrivateKeyPem(junk, Algorithm::RsaSha256);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().message.find("no unencrypted PEM private key") != std::string::npos);
  }
  auto missing = loadPrivateKeyFile("/nonexistent/dkim.key", Algorithm::RsaSha256);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().message.find("/nonexistent/dkim.key") != std::string::npos);

  CHECK_FALSE(generateKey(Algorithm::RsaSha256, 1024).ok());
  CHECK_FALSE(generateKey(Algorithm::RsaSha256, 8192).ok());
}

TEST_CASE("txtZoneStrings splits at 255 bytes") {
  CHECK(txtZoneStrings("v=DKIM1; k=ed25519; p=abc") == "\"v=DKIM1; k=ed25519; p=abc\"");
  std::string txt = rsaKey()->txtRecord();
  std::string z = txtZoneStrings(txt);
  CHECK(z == "\"" + txt.substr(0, 255) + "\" \"" + txt.substr(255) + "\"");
  CHECK(txtZoneStrings("a\"b\\") == "\"a\\\"b\\\\\"");
}

// ---- RFC 8463 Appendix A.3 ----------------------------------------------------------------

TEST_CASE("RFC 8463 A.3 signed message verifies and Ed25519 b= is reproduced") {
  const std::string msg =
      "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
      " d=football.example.com; i=@football.example.com;\r\n"
      " q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
      " subject : date : message-id : from : subject : date;\r\n"
      " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
      " b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
      " Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
      "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
      " d=football.example.com; i=@football.example.com;\r\n"
      " q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
      " date : message-id : from : subject : date;\r\n"
      " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
      " b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
      " DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
      " dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n"
      "From: Joe SixPack <joe@football.example.com>\r\n"
      "To: Suzie Q <suzie@shopping.example.net>\r\n"
      "Subject: Is dinner ready?\r\n"
      "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
      "Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
      "\r\n"
      "Hi.\r\n"
      "\r\n"
      "We lost the game.  Are you hungry yet?\r\n"
      "\r\n"
      "Joe.\r\n"
      "\r\n";
  StreamingBodyHash h;
  h.update(msg);
  CHECK(util::base64Encode(h.finish().relaxed) == "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=");
  CHECK(verify(msg, kRfc8463Ed25519Txt, 0) == "ok");
  CHECK(verify(msg, kRfc8463RsaTxt, 1) == "ok");
  CHECK(verify(replace(msg, "Is dinner", "Is lunch"), kRfc8463Ed25519Txt, 0) != "ok");

  // Ed25519 is deterministic (RFC 8032): hashing the same data must give the same b=.
  Msg m = splitMessage(msg);
  std::string data;
  for (const char* name : {"from", "to", "subject", "date", "message-id"}) {
    for (const auto& f : m.fields) {
      if (fieldName(f) == name) data += canonicalizeHeader(f, Canon::Relaxed);
    }
  }
  std::string s = canonicalizeHeader(withEmptyB(m.fields[0]), Canon::Relaxed);
  data += s.substr(0, s.size() - 2);
  auto key = loadPrivateKeyPem(kRfc8463Ed25519Pem, Algorithm::Ed25519Sha256);
  REQUIRE(key.ok());
  auto sig = (*key)->signRaw(sha256(data));
  REQUIRE(sig.ok());
  CHECK(util::base64Encode(*sig) ==
        "/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11BusFa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==");
}

// ---- signing ---------------------------------------------------------------------------

TEST_CASE("RSA sign then verify; tampering breaks it") {
  const std::string field = signOne(kMessage, rsaKey());
  const std::string txt = rsaKey()->txtRecord();
  const std::string signedMsg = field + kMessage;
  CHECK(verify(signedMsg, txt) == "ok");

  // Tag order and values (RFC 6376 3.5), no l=, folded lines within 78 characters.
  std::string flat = unfold(field);
  CHECK(flat.rfind("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=sel; t=1709287200; h=", 0) == 0);
  CHECK(flat.find(" l=") == std::string::npos);
  CHECK(flat.find(" x=") == std::string::npos);
  REQUIRE(field.size() > 2);
  CHECK(field.substr(field.size() - 2) == "\r\n");
  for (auto line : util::split(field.substr(0, field.size() - 2), '\n')) {
    CHECK(line.size() <= 79);  // 78 plus the CR
  }

  CHECK(verify(field + replace(kMessage, "Quarterly", "Annual"), txt) == "signature does not verify");
  CHECK(verify(field + replace(kMessage, "numbers", "Numbers"), txt) == "body hash mismatch");
  CHECK(verify(field + replace(kMessage, "<abc123@", "<abc124@"), txt) != "ok");
  // Oversigning: an added From, Subject, Reply-To or (absent) Cc breaks the signature.
  CHECK(verify(field + "From: mallory@evil.example\r\n" + kMessage, txt) != "ok");
  CHECK(verify(field + replace(kMessage, "X-Mailer", "Subject: buy now\r\nX-Mailer"), txt) != "ok");
  CHECK(verify(field + replace(kMessage, "X-Mailer", "Cc: eve@evil.example\r\nX-Mailer"), txt) != "ok");
  CHECK(verify(field + replace(kMessage, "X-Mailer", "Reply-To: eve@evil.example\r\nX-Mailer"), txt) != "ok");
  // Unsigned fields, relaxed whitespace changes and added trailing empty lines are fine.
  CHECK(verify(field + "Received: by another hop\r\n" + kMessage, txt) == "ok");
  CHECK(verify(field + replace(kMessage, "Quarterly   report", "Quarterly report"), txt) == "ok");
  CHECK(verify(field + kMessage + "\r\n\r\n", txt) == "ok");
  CHECK(verify(field + replace(kMessage, "X-Mailer: test", "X-Mailer: other"), txt) == "ok");
}

TEST_CASE("h= lists present fields and oversigns From, To, Cc, Subject, Date, Reply-To") {
  std::string flat = unfold(signOne(kMessage, edKey()));
  std::string h = tagValue(flat, "h");
  CHECK(h == "From:From:To:To:Cc:Subject:Subject:Date:Date:Message-ID:Reply-To:MIME-Version:Content-Type");
  // The foreign DKIM-Signature and unlisted fields are not signed.
  CHECK(util::toLower(h).find("dkim-signature") == std::string::npos);
  CHECK(h.find("Received") == std::string::npos);
  CHECK(h.find("X-Mailer") == std::string::npos);

  // Several instances: each is listed, plus one for oversigning; bottom-up selection
  // (RFC 6376 5.4.2) must line up with the verifier's.
  const std::string msg2 = replace(kMessage, "X-Mailer: test\r\n",
                                   "To: Dave <dave@example.net>\r\nList-Unsubscribe: <mailto:u@example.com>\r\n"
                                   "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nReferences: <r@x>\r\n");
  std::string field2 = signOne(msg2, rsaKey());
  CHECK(tagValue(unfold(field2), "h") ==
        "From:From:To:To:To:Cc:Subject:Subject:Date:Date:Message-ID:Reply-To:References:MIME-Version:"
        "Content-Type:List-Unsubscribe:List-Unsubscribe-Post");
  CHECK(verify(field2 + msg2, rsaKey()->txtRecord()) == "ok");
  // Swapping the two To fields changes what the bottom-up order covers.
  std::string swapped = replace(replace(msg2, "To: Dave <dave@example.net>\r\n", ""), "From: Alice",
                                "To: Dave <dave@example.net>\r\nFrom: Alice");
  CHECK(verify(field2 + swapped, rsaKey()->txtRecord()) != "ok");
}

TEST_CASE("Ed25519 sign then verify, x= and simple canonicalisation") {
  SignOptions o = opts(Canon::Simple, Canon::Simple);
  o.expiresAfter = 86400;
  const std::string field = signOne(kMessage, edKey(), o);
  std::string flat = unfold(field);
  CHECK(flat.rfind("DKIM-Signature: v=1; a=ed25519-sha256; c=simple/simple; d=example.com; s=sel; "
                   "t=1709287200; x=1709373600; h=",
                   0) == 0);
  const std::string txt = edKey()->txtRecord();
  CHECK(verify(field + kMessage, txt) == "ok");
  // Simple: whitespace changes in a signed header or trailing body whitespace break it.
  CHECK(verify(field + replace(kMessage, "Quarterly   report", "Quarterly report"), txt) != "ok");
  CHECK(verify(field + replace(kMessage, "in.  \r\n", "in.\r\n"), txt) == "body hash mismatch");
  // But trailing empty lines are ignored by simple body canonicalisation too.
  CHECK(verify(field + kMessage + "\r\n", txt) == "ok");
  CHECK(verify(field + replace(kMessage, "Hello Bob", "Hello Rob"), txt) == "body hash mismatch");

  const std::string mixed = signOne(kMessage, edKey(), opts(Canon::Relaxed, Canon::Simple));
  CHECK(unfold(mixed).find(" c=relaxed/simple;") != std::string::npos);
  CHECK(verify(mixed + kMessage, txt) == "ok");
}

TEST_CASE("dual signing: RSA then Ed25519, both verify, precomputed body hashes") {
  LocalSigner signer;
  StreamingBodyHash bh;
  for (size_t i = 0; i < kMessage.size(); i += 7) bh.update(std::string_view(kMessage).substr(i, 7));
  auto digests = bh.finish();
  std::vector<SignerKey> keys = {{"Example.COM", "rsa1", rsaKey()}, {"example.com", "ed1", edKey()}};
  auto r = signer.sign(kMessage, keys, opts(), &digests);
  REQUIRE(r.ok());
  auto r2 = signer.sign(kMessage, keys, opts());
  REQUIRE(r2.ok());
  CHECK(*r == *r2);  // RSA PKCS#1 v1.5 and Ed25519 are deterministic
  const std::string signedMsg = *r + kMessage;
  CHECK(verify(signedMsg, rsaKey()->txtRecord(), 0) == "ok");
  CHECK(verify(signedMsg, edKey()->txtRecord(), 1) == "ok");
  CHECK(unfold(*r).find("d=example.com; s=rsa1;") != std::string::npos);
  CHECK(unfold(*r).find("a=ed25519-sha256") > unfold(*r).find("a=rsa-sha256"));
}

TEST_CASE("sign errors") {
  LocalSigner signer;
  CHECK_FALSE(signer.sign(kMessage, {}, opts()).ok());
  auto noFrom = signer.sign("To: a@b\r\n\r\nbody\r\n", {{"example.com", "s", edKey()}}, opts());
  REQUIRE_FALSE(noFrom.ok());
  CHECK(noFrom.error().message.find("From") != std::string::npos);
  CHECK_FALSE(signer.sign(kMessage, {{"example.com", "s;x=1", edKey()}}, opts()).ok());
  CHECK_FALSE(signer.sign(kMessage, {{"example.com", "s", nullptr}}, opts()).ok());
  SignOptions o = opts();
  o.expiresAfter = 0;
  CHECK_FALSE(signer.sign(kMessage, {{"example.com", "s", edKey()}}, o).ok());
}

TEST_CASE("KeyRing: case-insensitive domains, RSA first") {
  KeyRing ring;
  CHECK(ring.empty());
  ring.add({"Example.COM", "ed", edKey()});
  ring.add({"example.com", "rsa", rsaKey()});
  ring.add({"other.example", "ed", edKey()});
  CHECK_FALSE(ring.empty());
  const auto* keys = ring.forDomain("EXAMPLE.com");
  REQUIRE(keys != nullptr);
  REQUIRE(keys->size() == 2);
  CHECK((*keys)[0].selector == "rsa");
  CHECK((*keys)[1].selector == "ed");
  CHECK((*keys)[1].domain == "example.com");
  CHECK(ring.forDomain("sub.example.com") == nullptr);
  CHECK(ring.forDomain("other.example")->size() == 1);
}
