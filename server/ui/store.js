// What the page keeps: conversations in localStorage, the API key in sessionStorage only (gone
// when the tab closes, never in a URL or in localStorage).

const CONVERSATIONS = "mixtral-ui.conversations";
const KEY = "mixtral-ui.key";

export function loadKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function saveKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

export function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(CONVERSATIONS) || "[]");
    return Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages)) : [];
  } catch {
    return [];
  }
}

export function saveConversations(list) {
  try {
    localStorage.setItem(CONVERSATIONS, JSON.stringify(list));
  } catch {
    // storage full or disabled: the conversation still lives in the page
  }
}

export function newConversation() {
  return { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "New chat", messages: [] };
}
