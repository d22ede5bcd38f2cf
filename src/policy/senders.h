// Sender authorisation (RFC 6409 section 8.1 "MAY ... verify that the submitter is
// authorised to use the address"): accounts[].senders entries are "@domain" (any local
// part at that domain, exactly that domain) or a full address. Domains compare
// case-insensitively; local parts compare exactly, except that the whole address is
// compared case-insensitively for plain ASCII dot-atoms (what every provider does).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace subrelay::policy {

bool senderAllowed(const std::vector<std::string>& senders, std::string_view address);

// Splits "local@domain" at the last '@'. False when there is no '@' or a side is empty.
bool splitAddress(std::string_view address, std::string_view& local, std::string_view& domain);

}  // namespace subrelay::policy
