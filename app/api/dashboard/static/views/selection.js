// The jobs ticked for comparison, kept for the browser tab (across pages and filters).

const STORAGE = "trainsvc.compare";

function read() {
  try {
    return JSON.parse(sessionStorage.getItem(STORAGE) || "[]");
  } catch {
    return [];
  }
}

export const selection = {
  ids: read,
  has: (id) => read().includes(id),
  toggle(id, on) {
    const ids = read().filter((other) => other !== id);
    if (on) ids.push(id);
    sessionStorage.setItem(STORAGE, JSON.stringify(ids));
  },
  clear: () => sessionStorage.removeItem(STORAGE),
};
