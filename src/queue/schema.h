// The queue's SQLite schema as a list of forward migrations, and the runner that applies
// them at open. Internal to queue/ (and its tests): nobody else includes sqlite3.h.
//
// Versioning: `PRAGMA user_version` holds the number of the last migration applied;
// `PRAGMA application_id` marks the file as ours so a stray database is refused instead of
// being "migrated". Migrations only ever move forward; a file written by a newer subrelay
// is refused (it may hold states or columns this code would mishandle).
#pragma once

#include <span>
#include <string>

#include "util/result.h"

struct sqlite3;

namespace subrelay::queue::schema {

// 'SRLY' — see https://www.sqlite.org/fileformat.html#application_id
inline constexpr int kApplicationId = 0x53524C59;

struct Migration {
  int version;      // user_version after this step; steps are listed in increasing order
  const char* sql;  // one or more statements, run inside the migration transaction
};

// The migrations of this build. The last one's version is SqliteStore::kSchemaVersion.
std::span<const Migration> migrations();

// Reads an integer pragma ("PRAGMA user_version"). False (and *error set) on failure.
bool readPragmaInt(sqlite3* db, const char* sql, int* out, std::string* error);
// Reads user_version. Returns -1 (and sets *error) on failure.
int readVersion(sqlite3* db, std::string* error);

// Brings the database from its current version to `target` by running every step with
// current < version <= target, all in one BEGIN IMMEDIATE transaction (so a half-migrated
// file never exists, and two processes opening at once do not both migrate). Refuses a
// database whose version is above `target` or whose application_id is someone else's.
util::Result<int> migrate(sqlite3* db, std::span<const Migration> steps, int target);

}  // namespace subrelay::queue::schema
