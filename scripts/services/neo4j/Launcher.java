// Starts a real Neo4j 5.26 (neo4j-harness) with Bolt and HTTP on 127.0.0.1 for tests.
// Run with Java's single-file source launch: java -cp 'lib/*' Launcher.java BOLT HTTP DIR PASSWORD
// Auth is enabled like a production server: user `neo4j`, the password given (set at start).
// Prints "READY <bolt uri>" once Bolt answers, then runs until killed (SIGTERM closes it cleanly).
import java.nio.file.Path;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.HttpConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.harness.Neo4j;
import org.neo4j.harness.Neo4jBuilders;

public class Launcher {
    public static void main(String[] args) throws Exception {
        int bolt = Integer.parseInt(args[0]);
        int http = Integer.parseInt(args[1]);
        Path dir = Path.of(args[2]);
        String password = args[3];
        Neo4j neo = Neo4jBuilders.newInProcessBuilder(dir)
                .withConfig(BoltConnector.enabled, true)
                .withConfig(BoltConnector.listen_address, new SocketAddress("127.0.0.1", bolt))
                .withConfig(BoltConnector.advertised_address, new SocketAddress("127.0.0.1", bolt))
                .withConfig(HttpConnector.enabled, true)
                .withConfig(HttpConnector.listen_address, new SocketAddress("127.0.0.1", http))
                .withConfig(HttpConnector.advertised_address, new SocketAddress("127.0.0.1", http))
                .withConfig(GraphDatabaseSettings.auth_enabled, true)
                .withConfig(GraphDatabaseSettings.pagecache_memory, 512L * 1024 * 1024)
                .build();
        Runtime.getRuntime().addShutdownHook(new Thread(neo::close));
        neo.databaseManagementService()
                .database("system")
                .executeTransactionally(
                        "ALTER USER neo4j SET PASSWORD $pw CHANGE NOT REQUIRED",
                        java.util.Map.of("pw", password));
        System.out.println("READY " + neo.boltURI());
        System.out.flush();
        Thread.currentThread().join();
    }
}
