"use strict";
// The approver's Ed25519 key lives in this browser only: generated non-extractable with WebCrypto and
// kept in IndexedDB. Decisions are signed over the same canonical message the CLI signs
// (contracts/signatures.py): context, plan id, plan hash, approver, decision, signed_at, sha256(comment).

const DB_NAME = "billing-remediation-approvals";
const STORE = "keys";

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function storeOp(mode, op) {
  const db = await openDb();
  return new Promise((resolve, reject) => {
    const request = op(db.transaction(STORE, mode).objectStore(STORE));
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

const loadKey = (name) => storeOp("readonly", (s) => s.get(name));
const saveKey = (name, pair) => storeOp("readwrite", (s) => s.put(pair, name));

async function keyFor(name, create) {
  let pair = await loadKey(name);
  if (!pair && create) {
    pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    await saveKey(name, pair);
  }
  return pair || null;
}

function base64(buffer) {
  return btoa(String.fromCharCode(...new Uint8Array(buffer)));
}

async function sha256Hex(text) {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function meta(name) {
  return document.querySelector(`meta[name="${name}"]`).content;
}

async function sign(pair, fields) {
  const message = [
    meta("signing-context"), fields.plan_id || "", fields.plan_hash, fields.approver, fields.decision,
    fields.signed_at || "", await sha256Hex(fields.comment),
  ].join("\n");
  const signature = await crypto.subtle.sign({ name: "Ed25519" }, pair.privateKey, new TextEncoder().encode(message));
  return { ...fields, signature: base64(signature) };
}

function say(element, text, kind) {
  element.textContent = text;
  element.className = kind || "";
}

function setUpKeys() {
  const form = document.getElementById("key-form");
  if (!form) return;
  const nameInput = document.getElementById("key-name");
  nameInput.value = localStorage.getItem("approver") || "";
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = document.getElementById("key-status");
    const name = nameInput.value.trim();
    try {
      const pair = await keyFor(name, true);
      const publicKey = base64(await crypto.subtle.exportKey("raw", pair.publicKey));
      localStorage.setItem("approver", name);
      document.getElementById("public-key").textContent = publicKey;
      document.getElementById("approver-entry").textContent = JSON.stringify({ name, public_key: publicKey });
      document.getElementById("key-result").hidden = false;
      say(status, `Key for ${name} is on this device.`, "ok");
    } catch (err) {
      say(status, `Could not make a key: ${err.message || err} (this browser needs Ed25519 in WebCrypto).`, "error");
    }
  });
}

function setUpDecision() {
  const form = document.getElementById("decision-form");
  if (!form) return;
  const plan = document.getElementById("plan").dataset;
  const approver = document.getElementById("approver");
  approver.value = localStorage.getItem("approver") || "";
  const status = document.getElementById("decision-status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const decision = event.submitter ? event.submitter.value : "approve";
    const name = approver.value.trim();
    const pair = await keyFor(name, false);
    if (!pair) {
      say(status, `No signing key for ${name} on this device: make one on the "My signing key" page first.`, "error");
      return;
    }
    for (const button of form.querySelectorAll("button")) button.disabled = true;
    say(status, "Signing and sending…");
    try {
      const body = await sign(pair, {
        plan_id: plan.planId, plan_hash: plan.planHash, approver: name, decision,
        comment: document.getElementById("comment").value, signed_at: new Date().toISOString(),
      });
      const response = await fetch(`/runs/${plan.workflowId}/decision`, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": meta("csrf-token") },
        body: JSON.stringify(body),
        credentials: "same-origin",
      });
      const answer = await response.json();
      if (response.ok) {
        localStorage.setItem("approver", name);
        say(status, `Recorded: ${answer.answer}`, "ok");
      } else {
        say(status, `Not accepted: ${answer.error}`, "error");
        for (const button of form.querySelectorAll("button")) button.disabled = false;
      }
    } catch (err) {
      say(status, `Could not send: ${err.message || err}`, "error");
      for (const button of form.querySelectorAll("button")) button.disabled = false;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpKeys();
  setUpDecision();
});
