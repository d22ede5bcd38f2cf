// Sends mail through subrelay with nodemailer, the way a Node web app does; driven by
// test_submit_nodemailer.py.
//
// Usage: node nodemailer_send.js JOB.json
// JOB: { host, port, secure, requireTLS, user, pass, ca (path), pool, maxConnections,
//        maxMessages, name (EHLO), timeoutMs,
//        messages: [{ from, to: [..], cc: [..], bcc: [..], subject, text, messageId,
//                     envelope?: {from, to} }] }
// Prints one JSON line per message, in order:
//   { ok: true, messageId, response, accepted, rejected, envelope }
//   { ok: false, error, code, responseCode, response, command }
// and exits 0 (the Python side judges the results), or 3 on a bad job file.
'use strict';

const fs = require('fs');
const nodemailer = require('nodemailer');

async function main() {
  let job;
  try {
    job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  } catch (e) {
    process.stderr.write(`bad job file: ${e.message}\n`);
    process.exit(3);
  }
  const timeout = job.timeoutMs || 20000;
  const transport = nodemailer.createTransport({
    host: job.host,
    port: job.port,
    secure: !!job.secure,
    requireTLS: !!job.requireTLS,
    name: job.name || 'nodemailer.subrelay.test',
    auth: { user: job.user, pass: job.pass },
    tls: { ca: [fs.readFileSync(job.ca)], servername: job.servername || undefined },
    pool: !!job.pool,
    maxConnections: job.maxConnections || 5,
    maxMessages: job.maxMessages || 100,
    connectionTimeout: timeout,
    greetingTimeout: timeout,
    socketTimeout: timeout,
  });

  const send = async (m) => {
    const mail = {
      from: m.from,
      to: m.to,
      cc: m.cc,
      bcc: m.bcc,
      subject: m.subject,
      text: m.text,
      messageId: m.messageId,
    };
    if (m.envelope) mail.envelope = m.envelope;
    try {
      const info = await transport.sendMail(mail);
      return {
        ok: true,
        messageId: info.messageId,
        response: info.response,
        accepted: info.accepted,
        rejected: info.rejected,
        envelope: info.envelope,
      };
    } catch (e) {
      return {
        ok: false,
        error: e.message,
        code: e.code,
        responseCode: e.responseCode,
        response: e.response,
        command: e.command,
      };
    }
  };

  // Pooled transports get every message at once (that is what exercises the pool);
  // single-connection ones send one after the other.
  let results;
  if (job.pool) {
    results = await Promise.all(job.messages.map(send));
  } else {
    results = [];
    for (const m of job.messages) results.push(await send(m));
  }
  transport.close();
  for (const r of results) process.stdout.write(JSON.stringify(r) + '\n');
}

main().catch((e) => {
  process.stderr.write(`nodemailer_send.js: ${e.stack || e}\n`);
  process.exit(4);
});
